"""Train / val / test assignment without leakage, stable across runs and cluster sizes.

``hash``: every row of one entity (``split.key``, default the id) lands in the same split. The split
is a pure function of the key and ``split.seed`` -- the first 52 bits of SHA-256("<seed>|<key>") as
a uniform number in [0, 1) compared with the cumulative fractions -- so it never depends on
``rand()``, partitioning or the number of executors, and can be recomputed anywhere (even in Python).

``time``: train before val before test by event time. Boundaries come from ``split.boundaries`` or
from the fractions. For the latter we use an exact histogram instead of ``approxQuantile``: the
approximate quantile sketch is merged per partition, so its answer can move with the partitioning;
counting rows per fixed-width time bucket (one ``agg`` for min/max, one grouped count over at most
100,000 buckets) gives the same boundaries for the same data on any cluster. A boundary is a bucket
edge; rows with ``ts < val`` are train, ``val <= ts < test`` val, the rest test, so no event in an
earlier split is later than any event in a later one.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from downpour.config import Config
from downpour.errors import DataContractError
from downpour.pipelines.clean import literal

SPLITS = ("train", "val", "test")
_BUCKETS = 100_000
_UNIT_BITS = 52


def hash_unit(key: Column, seed: int) -> Column:
    """Uniform in [0, 1) from SHA-256("<seed>|<key>"): identical in Spark, Python and on any cluster."""
    digest = F.sha2(F.concat(F.lit(f"{seed}|"), key.cast("string")), 256)
    return F.conv(F.substring(digest, 1, _UNIT_BITS // 4), 16, 10).cast("double") / float(2 ** _UNIT_BITS)


def hash_unit_py(key: str, seed: int) -> float:
    """The same number in plain Python (documentation and tests)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()
    return int(digest[: _UNIT_BITS // 4], 16) / float(2 ** _UNIT_BITS)


def _by_threshold(u: Column, lo: Any, hi: Any) -> Column:
    return F.when(u < lo, F.lit("train")).when(u < hi, F.lit("val")).otherwise(F.lit("test"))


def assign_hash_split(df: DataFrame, cfg: Config) -> DataFrame:
    """``split`` by the entity key; a null key falls back to the row id (a singleton entity)."""
    names = cfg.names
    key_col = cfg.split_key
    key = F.col("row_id") if key_col is None else F.coalesce(F.col(names[key_col]).cast("string"), F.col("row_id"))
    f = cfg.split.fractions
    return df.withColumn("split", _by_threshold(hash_unit(key, cfg.split.seed), f["train"], f["train"] + f["val"]))


def _ordinal(col: Column, typ: str) -> Column:
    """Event time as an integer that orders like it: epoch microseconds, or the number itself."""
    if typ in ("timestamp", "date"):
        return F.unix_micros(col.cast("timestamp"))
    return col.cast("double")


def time_boundaries(df: DataFrame, cfg: Config) -> dict[str, Any]:
    """``{"val": b1, "test": b2}`` as Python values of the time column's type (explicit or exact)."""
    names = cfg.names
    col = cfg.split_time_column
    assert col is not None
    typ = cfg.schema_[col]
    if cfg.split.boundaries:
        b = cfg.split.boundaries
        return {"val": b["val"], "test": b["test"], "source": "config",
                "val_ordinal": None, "test_ordinal": None}
    o = _ordinal(F.col(names[col]), typ)
    mm = df.agg(F.min(o).alias("lo"), F.max(o).alias("hi"), F.count(o).alias("n")).first()
    if mm is None or not mm["n"]:
        raise DataContractError(f"column {col!r} in {cfg.input.path}: no event times to split on")
    lo, hi, n = mm["lo"], mm["hi"], int(mm["n"])
    width = max(1, math.ceil((hi - lo + 1) / _BUCKETS)) if typ in ("timestamp", "date") else \
        max((hi - lo) / _BUCKETS, 1e-12)
    bucket = F.floor((o - F.lit(lo)) / F.lit(width)).cast("long")
    hist = sorted((int(r[0]), int(r[1])) for r in df.groupBy(bucket).count().collect())
    f = cfg.split.fractions
    edges = {"val": _edge(hist, n, f["train"]), "test": _edge(hist, n, f["train"] + f["val"])}
    out: dict[str, Any] = {"source": "fractions"}
    for name, k in edges.items():
        value = lo + k * width
        out[f"{name}_ordinal"] = value
        if typ in ("timestamp", "date"):
            ts = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(value))
            out[name] = ts.isoformat().replace("+00:00", "Z")
        else:
            out[name] = value
    return out


def _edge(hist: list[tuple[int, int]], n: int, fraction: float) -> int:
    """The bucket edge k whose count of rows before it is closest to fraction * n (ties: the lower)."""
    target = fraction * n
    best_k, best_err, before = 0, abs(target), 0
    for k, c in hist:
        err = abs(before - target)
        if err < best_err:
            best_k, best_err = k, err
        before += c
        err = abs(before - target)
        if err < best_err:
            best_k, best_err = k + 1, err
    return best_k


def assign_time_split(df: DataFrame, cfg: Config,
                      boundaries: dict[str, Any]) -> DataFrame:
    names = cfg.names
    col = cfg.split_time_column
    assert col is not None
    typ = cfg.schema_[col]

    def bound(name: str) -> Column:  # exact ordinals from the histogram; config text in the session zone
        o = boundaries.get(f"{name}_ordinal")
        return F.lit(o) if o is not None else _ordinal(literal(boundaries[name], typ), typ)

    o = _ordinal(F.col(names[col]), typ)
    return df.withColumn("split", _by_threshold(o, bound("val"), bound("test")))


def assign_split(df: DataFrame, cfg: Config) -> tuple[DataFrame, dict[str, Any]]:
    """Add ``split``; returns the frame and what the manifest should say about how it was made."""
    info: dict[str, Any] = {"method": cfg.split.method, "fractions": dict(cfg.split.fractions),
                            "seed": cfg.split.seed}
    if cfg.split.method == "hash":
        info["key"] = cfg.split_key or "row_id"
        return assign_hash_split(df, cfg), info
    b = time_boundaries(df, cfg)
    info.update(column=cfg.split_time_column, boundaries={"val": str(b["val"]), "test": str(b["test"])},
                boundaries_from=b["source"])
    return assign_time_split(df, cfg, b), info


def split_counts(df: DataFrame) -> dict[str, dict[str, int]]:
    """Rows and positives per split, in one aggregation."""
    rows = df.groupBy("split").agg(F.count(F.lit(1)).alias("rows"), F.sum("label").alias("positives")).collect()
    out = {s: {"rows": 0, "positives": 0} for s in SPLITS}
    for r in rows:
        out[r["split"]] = {"rows": int(r["rows"]), "positives": int(r["positives"] or 0)}
    return out
