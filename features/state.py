"""FeatureState: statistics, quantiles and vocabularies fitted on the train split, applied to every split.

``fit`` first resolves the config against the data into a frozen ``FitPlan`` (every name and type
checked, no Spark job), then runs a few Spark passes whatever the number of columns (exact quantiles
for every median and clip bound, one ``agg`` for every null count / mean / std, one ``groupBy`` over
exploded (column, value) pairs for every vocabulary; the last two through features/passes.py, which
``fitting`` lets other fits of the same rows share) and assembles the JSON from them. Every statistic is
exact or summed in integers, so the fit depends on the train rows alone, not on their order or
partitioning (features/exact.py).
``transform`` is one projection plus broadcast joins against the (small) vocabularies, and gives the
model-ready shard columns of DEVELOPERS.md. The same arithmetic is rebuilt as Keras layers by
``features.keras_preprocessing`` from the JSON alone, so the exported model takes raw columns (see
DEVELOPERS.md "feature_state.json" and "Serving inputs").

This module never imports TensorFlow (Spark stages must not).

Long on purpose: fit, transform, JSON and the serving frame of the one FeatureState contract must
stay in step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from downpour import storage
from downpour.config import CategoricalSpec, Config
from downpour.errors import ConfigError, DataContractError
from downpour.features import exact
from downpour.features.hashing import hash_buckets
from downpour.features.passes import Counted, Passes, TopValues
from downpour.features.windows import window_features
from downpour.logs import LOG, timed
from downpour.storage import HadoopFS

VERSION = 1
INT64_NULL = -(2**63)  # how serving spells a null integer category or timestamp (int64 has no null)
# what cleaning trims (pipelines.ingest.WHITESPACE): Spark strips these characters from both ends with
# ``btrim`` (faster than a regex replace per value: benchmarks/README.md, "Investigation: per-row
# expressions and the hot-key count"), TensorFlow with this RE2 pattern (the
# characters are literal inside the class), which removes the same leading and trailing runs
WHITESPACE = " \t\r\n\u00a0"
TRIM_PATTERN = f"\\A[{WHITESPACE}]+|[{WHITESPACE}]+\\z"
CROSS_PRIME = 2_147_483_647  # hashed crosses: polynomial hash mod 2^31-1, then Knuth's multiplicative hash
CROSS_MULT = 2_654_435_761
_MAX_CARD = 2**32  # keeps every hashed-cross product below 2^63 in Spark and TensorFlow
# vocabularies up to this size are looked up in a map literal inside the projection (no join, one
# stage); larger ones through a broadcast hash join (a map literal lookup scans its keys)
SMALL_VOCAB = 256


def default_embedding_dim(cardinality: int) -> int:
    """A common rule of thumb (1.6 * n^0.56), capped: embeddings grow slowly with the vocabulary."""
    return int(min(64, max(2, round(1.6 * cardinality**0.56))))


# ---- Spark expressions shared by fit and transform --------------------------------------------------
def _missing(x: Column) -> Column:
    return x.isNull() | F.isnan(x)


def _pre_scale(src: str, impute: float, clip: list[float] | None, transform: str) -> Column:
    """Raw value -> imputed, clipped, transformed double (before standardization)."""
    x = F.col(src).cast("double")
    x = F.when(_missing(x), F.lit(float(impute))).otherwise(x)
    if clip is not None:
        x = F.least(F.greatest(x, F.lit(float(clip[0]))), F.lit(float(clip[1])))
    if transform == "log1p":  # signed, so refunds / negative balances stay finite
        x = F.signum(x) * F.log1p(F.abs(x))
    return x


def _numeric_value(n: dict[str, Any]) -> Column:
    x = _pre_scale(n["source"], n["impute"], n["clip"], n["transform"])
    return ((x - F.lit(float(n["mean"]))) / F.lit(float(n["std"]))).cast("float")


def _category_string(src: str, dtype: str, strings: dict[str, bool], impute: str | None = None) -> Column:
    """The category as a string, normalized like serving normalizes it; null for null or empty
    (or the cleaning stage's imputed value, so a null sent to serving gets what cleaning gives it)."""
    s = F.col(src).cast("string")
    if dtype == "string":
        if strings.get("trim"):
            s = F.btrim(s, F.lit(WHITESPACE))
        if strings.get("lower"):
            s = F.lower(s)
    s = F.when(s != "", s)
    return s if impute is None else F.coalesce(s, F.lit(impute))


def _normalize(value: Any, dtype: str, strings: dict[str, bool]) -> str | None:
    """:func:`_category_string` for one Python value."""
    if value is None:
        return None
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if dtype == "string":
        text = text.strip(WHITESPACE) if strings.get("trim") else text
        text = text.lower() if strings.get("lower") else text
    return text or None


def _epoch_seconds(src: str, dtype: T.DataType) -> Column:
    if isinstance(dtype, T.TimestampType | T.TimestampNTZType):
        return F.unix_seconds(F.col(src).cast("timestamp"))
    if isinstance(dtype, T.DateType):
        return F.unix_date(F.col(src)).cast("long") * F.lit(86_400)
    return F.col(src).cast("long")


def _time_part(secs: Column, kind: str) -> Column:
    """1 + hour of day (UTC) or 1 + day of week (Monday = 1 .. Sunday = 7); 0 for null."""
    sod = F.pmod(secs, F.lit(86_400))
    if kind == "hour":
        idx = ((sod - F.pmod(sod, F.lit(3_600))) / F.lit(3_600)).cast("long") + 1
    else:
        days = ((secs - sod) / F.lit(86_400)).cast("long")
        idx = F.pmod(days + F.lit(3), F.lit(7)) + 1  # 1970-01-01 was a Thursday
    return F.coalesce(idx.cast("long"), F.lit(0).cast("long"))


def _cross(idx: list[Column], c: dict[str, Any]) -> Column:
    """Index of a cross from its sources' indices (exact product, or hashed into ``cardinality``)."""
    h: Column = F.lit(0).cast("long")
    if c["kind"] == "exact":
        for x, card in zip(idx, c["cardinalities"], strict=True):
            h = h * F.lit(card) + x
        return h
    for x, card in zip(idx, c["cardinalities"], strict=True):
        h = F.pmod(h * F.lit(card) + x, F.lit(CROSS_PRIME))
    return F.pmod(F.pmod(h * F.lit(CROSS_MULT), F.lit(2**32)), F.lit(c["cardinality"]))


def _hash_udf(buckets: int) -> Any:
    @F.pandas_udf("long")  # type: ignore[call-overload]
    def bucket(values: pd.Series) -> pd.Series:
        return pd.Series(hash_buckets(values.astype(object).where(values.notna(), None), buckets), dtype="int64")

    return bucket


class FeatureState:
    """Fitted feature transformation: build with :meth:`fit`, apply with :meth:`transform`."""

    def __init__(self, d: dict[str, Any]) -> None:
        self._d = d

    # ---- fitting -----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, train_df: DataFrame, cfg: Config, quantiles: exact.Table | None = None) -> FeatureState:
        """Fit on the train rows of ``train_df`` (rows of another ``split``, if the column is there, are
        ignored, so nothing about val/test can leak into the statistics). ``quantiles``: an
        :func:`exact.table` of those same rows holding :meth:`quantiles_wanted` (prepare computes one for
        this fit and the drift reference together); without it the fit computes its own."""
        if "split" in train_df.columns:
            train_df = train_df.where(F.col("split") == "train")
        passes = Passes()
        finish = cls.fitting(train_df, cfg, quantiles, passes)
        return finish(passes.run(train_df))

    @classmethod
    def fitting(cls, train_df: DataFrame, cfg: Config, quantiles: exact.Table | None,
                passes: Passes) -> Callable[[Counted], FeatureState]:
        """:meth:`fit` in two steps, so that other fits of the same rows share its passes (prepare's drift
        reference): check the config against the data, compute the quantiles and add the fit's
        aggregation and vocabularies to ``passes``; the caller runs them over ``train_df`` (the train
        rows only) and hands what they counted to the returned function, which assembles the state."""
        plan = _plan(train_df, cfg)
        clock = time.perf_counter()
        assemble = _fitting(train_df, cfg, plan, quantiles, passes)

        def finish(counted: Counted) -> FeatureState:
            d = assemble(counted)
            LOG.info(
                "feature state: %d numeric (+%d missing flags), %d categorical, %d crosses from %d train rows "
                "in %.1fs", len(d["numeric"]), len(d["flags"]), len(d["categorical"]), len(d["crosses"]),
                d["fitted_rows"], time.perf_counter() - clock,
            )
            return cls(d)

        return finish

    @staticmethod
    def quantiles_wanted(train_df: DataFrame, cfg: Config) -> dict[str, set[float]]:
        """The exact quantiles :meth:`fit` reads, per source column: extremes, median, clip bounds (the
        config checked against the data as :meth:`fit` checks it; no Spark job)."""
        return {n.source: _probs(n) for n in _plan(train_df, cfg).numeric}

    # ---- applying ----------------------------------------------------------------------------------
    def transform(self, df: DataFrame, keep: Sequence[str] = ()) -> DataFrame:
        """Model-ready columns: ``row_id``, ``label``, [``weight``], then ``n__*`` and ``c__*``.

        ``label`` (and ``weight``) are kept when present, so the same call serves unlabeled data;
        ``keep`` names columns carried through unchanged, last (prepare's ``split``: one transform of
        all splits instead of one per split).
        """
        d = self._d
        missing = [c for c in ["row_id", *d["raw_inputs"]] if c not in df.columns]
        if missing:
            raise DataContractError(f"column {missing[0]!r} is missing from the data to transform")
        head_names = ["row_id"] + [c for c in ("label", d["weight"]) if c and c in df.columns]
        head = [F.col(c).cast("string" if c == "row_id" else "float").alias(c) for c in head_names]

        flags = {f["source"]: f["name"] for f in d["flags"]}
        cleaning_flags = {f["source"]: f.get("cleaning_flag") for f in d["flags"]}
        num: list[Column] = []
        for n in d["numeric"]:
            num.append(_numeric_value(n).alias(n["name"]))
            if n["source"] in flags:
                miss = _missing(F.col(n["source"]).cast("double"))
                cleaning_flag = cleaning_flags.get(n["source"])
                if cleaning_flag and cleaning_flag in df.columns:  # the null was imputed by cleaning
                    miss = miss | (F.coalesce(F.col(cleaning_flag).cast("int"), F.lit(0)) == 1)
                num.append(miss.cast("float").alias(flags[n["source"]]))
        schema = {f.name: f.dataType for f in df.schema}
        cats: list[Column] = []
        keys: list[Column] = []
        for i, c in enumerate(d["categorical"]):
            src = c["sources"][0]
            if c["kind"] in ("hour", "dow"):
                cats.append(_time_part(_epoch_seconds(src, schema[src]), c["kind"]).alias(c["name"]))
            elif c["kind"] == "hash":
                s = _category_string(src, d["raw_inputs"][src], d["strings"], c.get("impute"))
                cats.append(_hash_udf(c["buckets"])(s).alias(c["name"]))
            elif c["vocab"] and len(c["vocab"]) <= SMALL_VOCAB:
                s = _category_string(src, d["raw_inputs"][src], d["strings"], c.get("impute"))
                lookup = F.create_map(*[F.lit(x) for j, v in enumerate(c["vocab"]) for x in (v, j + 1)])
                cats.append(F.coalesce(F.try_element_at(lookup, s), F.lit(0)).cast("long").alias(c["name"]))
            elif c["vocab"]:
                s = _category_string(src, d["raw_inputs"][src], d["strings"], c.get("impute"))
                keys.append(s.alias(f"__k{i}"))
            else:  # nothing in train: every value is out of vocabulary
                cats.append(F.lit(0).cast("long").alias(c["name"]))
        out = df.select(*head, *num, *cats, *keys, *keep)
        spark = df.sparkSession
        for i, c in enumerate(d["categorical"]):  # large vocabularies: broadcast hash joins
            if c["kind"] == "vocab" and len(c["vocab"] or []) > SMALL_VOCAB:
                table = spark.createDataFrame(
                    [(v, j + 1) for j, v in enumerate(c["vocab"])],
                    T.StructType([T.StructField(f"__v{i}", T.StringType()), T.StructField(f"__i{i}", T.LongType())]),
                )
                out = out.join(F.broadcast(table), out[f"__k{i}"] == table[f"__v{i}"], "left")
                out = out.withColumn(c["name"], F.coalesce(F.col(f"__i{i}"), F.lit(0).cast("long")))
        cat_names = [c["name"] for c in d["categorical"]]
        crosses = [
            _cross([F.col(s) for s in c["sources"]], c).cast("long").alias(c["name"]) for c in d["crosses"]
        ]
        return out.select(*head_names, *self.numeric_columns, *cat_names, *crosses, *keep)

    # ---- what training and serving need ------------------------------------------------------------
    @property
    def numeric_columns(self) -> list[str]:
        """Dense float32 shard columns, each value followed by its missing flag (if any)."""
        flags = {f["source"]: f["name"] for f in self._d["flags"]}
        out = []
        for n in self._d["numeric"]:
            out.append(n["name"])
            if n["source"] in flags:
                out.append(flags[n["source"]])
        return out

    @property
    def numeric(self) -> list[dict[str, Any]]:
        return [dict(n) for n in self._d["numeric"]]

    @property
    def flags(self) -> list[dict[str, Any]]:
        return [dict(f) for f in self._d["flags"]]

    @property
    def categorical(self) -> list[dict[str, Any]]:
        """int64 shard columns for embeddings: name, sources, kind, vocab, buckets, cardinality, embedding_dim."""
        return [dict(c) for c in self._d["categorical"]]

    @property
    def crosses(self) -> list[dict[str, Any]]:
        """int64 shard columns for the wide part: name, sources (c__ columns), kind, cardinality."""
        return [dict(c) for c in self._d["crosses"]]

    @property
    def raw_inputs(self) -> dict[str, str]:
        """The serving signature: raw column (safe name) -> "float64" | "int64" | "string"."""
        return dict(self._d["raw_inputs"])

    @property
    def strings(self) -> dict[str, bool]:
        return dict(self._d["strings"])

    @property
    def label(self) -> str:
        return self._d["label"]

    @property
    def weight(self) -> str | None:
        return self._d["weight"]

    @property
    def window_features(self) -> list[str]:
        return list(self._d["window_features"])

    @property
    def fitted_rows(self) -> int:
        return int(self._d["fitted_rows"])

    # ---- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureState:
        if not isinstance(d, dict) or d.get("version") != VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise DataContractError(f"feature_state.json: unsupported version {got!r} (expected {VERSION})")
        required = ["numeric", "flags", "categorical", "crosses", "raw_inputs", "label", "weight", "strings"]
        lacking = [k for k in required if k not in d]
        if lacking:
            raise DataContractError(f"feature_state.json: missing key {lacking[0]!r}")
        d = json.loads(json.dumps(d))
        d.setdefault("window_features", [])
        d.setdefault("fitted_rows", 0)
        return cls(d)

    def to_json(self) -> str:
        return json.dumps(self._d, indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> FeatureState:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataContractError(f"feature_state.json: not valid JSON ({exc})") from None
        return cls.from_dict(d)

    def save(self, path: str) -> None:
        """Write the JSON to a local path (atomically) or any Hadoop URL (hdfs://, s3a://, dbfs:/)."""
        text = self.to_json()
        if storage.is_file_url(path):
            storage.write_text_atomic(path, text)
        else:
            _hadoop(path).write_bytes(path, text.encode("utf-8"))
        LOG.info("feature state written to %s", path)

    @classmethod
    def load(cls, path: str) -> FeatureState:
        local = storage.is_file_url(path)
        if not (os.path.isfile(storage.local_path(path)) if local else _hadoop(path).exists(path)):
            raise DataContractError(f"feature_state.json: no such file {path} (run `downpour prepare` first)")
        text = storage.read_text(path) if local else _hadoop(path).read_bytes(path).decode("utf-8")
        return cls.from_json(text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureState) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"FeatureState(numeric={len(self._d['numeric'])}, flags={len(self._d['flags'])}, "
            f"categorical={len(self._d['categorical'])}, crosses={len(self._d['crosses'])})"
        )


# ---- serving inputs (Spark / pandas side, no TensorFlow) ------------------------------------------------
def serving_frame(df: DataFrame, state: FeatureState, keep: tuple[str, ...] = ()) -> DataFrame:
    """The raw columns in the serving dtypes: floats (NaN for null), strings ("" for null), int64
    (``INT64_NULL`` for null; timestamps as epoch seconds), after the ``keep`` columns (e.g. an id)
    unchanged. Batch scoring feeds these to the model (``pipelines.serving`` turns each pandas batch into
    the signature's arrays)."""
    schema = {f.name: f.dataType for f in df.schema}
    cols = [F.col(c) for c in keep]
    for name, dtype in state.raw_inputs.items():
        if name not in schema:
            raise DataContractError(f"column {name!r} is missing from the data to score")
        src = schema[name]
        if dtype == "float64":
            x = F.col(name).cast("double")
            cols.append(F.coalesce(x, F.lit(float("nan"))).alias(name))
        elif dtype == "string":
            cols.append(F.coalesce(F.col(name).cast("string"), F.lit("")).alias(name))
        else:
            is_time = isinstance(src, T.TimestampType | T.TimestampNTZType | T.DateType)
            x = _epoch_seconds(name, src) if is_time else F.col(name).cast("long")
            cols.append(F.coalesce(x, F.lit(INT64_NULL).cast("long")).alias(name))
    return df.select(*cols)


# ---- fitting internals: the plan (the config resolved against the train data; no Spark job) ---------------
@dataclass(frozen=True)
class NumericItem:
    """One numeric input to fit: a configured column or a window feature."""

    source: str                          # the data's column (safe name)
    transform: str                       # "standardize" | "log1p" | "none"
    q: tuple[float, float] | None        # clip quantiles
    flag: bool | None                    # missing flag: always / never / None = if train has a null
    cleaning_flag: str | None = None     # the 0/1 column where cleaning marked the nulls it imputed
    cleaning_value: float | None = None  # what cleaning imputed, when the config gives the value
    learn: bool = False                  # cleaning imputed a statistic: learn it from the flagged rows


@dataclass(frozen=True)
class CategoricalItem:
    """One configured categorical input to fit (vocabulary or hashed)."""

    source: str
    spec: CategoricalSpec
    dtype: str                           # the serving dtype: "string" | "int64"
    cleaning_flag: str | None = None
    cleaning_value: Any = None
    learn: bool = False


@dataclass(frozen=True)
class FitPlan:
    """What the Spark passes of :func:`_fit` fit, checked before any of them runs."""

    numeric: tuple[NumericItem, ...]      # configured columns, then window features
    categorical: tuple[CategoricalItem, ...]
    timestamps: tuple[str, ...]
    crosses: tuple[tuple[str, ...], ...]  # the source columns of each cross
    raw_inputs: dict[str, str]            # the serving signature, in the order the inputs were met
    windows: tuple[str, ...]
    strings: dict[str, bool]              # {"trim", "lower"}: how cleaning normalized strings
    weight: str | None


class _Columns:
    """Config names resolved against the data's schema; every serving input recorded once, with one dtype."""

    def __init__(self, df: DataFrame, cfg: Config) -> None:
        self.names = cfg.names
        self.schema = {f.name: f.dataType for f in df.schema}
        self.raw_inputs: dict[str, str] = {}
        self._nulls = cfg.cleaning.nulls

    def source(self, raw: str, key: str) -> str:
        """The data's column for config column ``raw``; ``key`` says where the config names it."""
        if raw not in self.names:
            raise ConfigError(f"{key}: column {raw!r} is not in the schema")
        s = self.names[raw]
        if s not in self.schema:
            raise DataContractError(f"column {raw!r} (internal {s!r}) is missing from the data ({key})")
        return s

    def need(self, s: str, dtype: str, key: str) -> None:
        """Serving feeds a column as one tensor: two features cannot want it in two dtypes."""
        if self.raw_inputs.setdefault(s, dtype) != dtype:
            raise ConfigError(f"{key}: column {s!r} cannot be both a {self.raw_inputs[s]} and a {dtype} input")

    def cleaning(self, raw: str, s: str) -> tuple[str | None, Any, bool]:
        """How the cleaning stage treated nulls of this column: its 0/1 flag column, its impute value, and
        whether that value is to be learned from the flagged train rows (cleaning imputed a statistic)."""
        pol = self._nulls.get(raw)
        flag = f"{s}__missing" if f"{s}__missing" in self.schema else None
        imputes = pol is not None and pol.action == "impute"
        value = pol.value if imputes and pol is not None else None
        return flag, value, bool(imputes and value is None and flag)


def _plan(df: DataFrame, cfg: Config) -> FitPlan:
    """Resolve the config into per-column work items, checking names and types (no Spark job). The steps
    run in config order (numeric, windows, categorical, timestamp, crosses), so the first mistake is reported."""
    cols = _Columns(df, cfg)
    numeric = _plan_numeric(cols, cfg)
    windows = _plan_windows(cols, cfg)
    categorical = _plan_categorical(cols, cfg)
    timestamps = _plan_timestamps(cols, cfg)
    crosses = _plan_crosses(cols, cfg, categorical)
    _check_required(cols, cfg)
    _check_unique_names([f"n__{n.source}" for n in numeric + windows]
                        + [f"c__{c.source}" for c in categorical]
                        + [f"c__{t}_{kind}" for t in timestamps for kind in ("hour", "dow")]
                        + ["c__" + "_x_".join(x) for x in crosses])  # before any Spark pass
    return FitPlan(
        numeric=tuple(numeric + windows), categorical=tuple(categorical), timestamps=tuple(timestamps),
        crosses=tuple(crosses), raw_inputs=cols.raw_inputs, windows=tuple(w.source for w in windows),
        strings={"trim": cfg.cleaning.trim, "lower": cfg.cleaning.lowercase_categoricals},
        weight="weight" if cfg.features.weight_column else None,
    )


def _plan_numeric(cols: _Columns, cfg: Config) -> list[NumericItem]:
    """Configured numerics: the model reads them as float64, so numbers (or booleans) only, and a number
    as the value cleaning imputed."""
    out = []
    for i, sp in enumerate(cfg.features.numeric_specs()):
        key = f"features.numeric[{i}]"
        s = cols.source(sp.column, key)
        if not isinstance(cols.schema[s], T.NumericType | T.BooleanType):
            raise ConfigError(f"{key}: column {sp.column!r} is {cols.schema[s].simpleString()}, not numeric")
        cols.need(s, "float64", key)
        flag, value, learn = cols.cleaning(sp.column, s)
        if value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"cleaning.nulls.{sp.column}.value: not a number") from None
        out.append(NumericItem(s, sp.transform, sp.clip_quantiles, sp.missing_flag, flag, value, learn))
    return out


def _plan_windows(cols: _Columns, cfg: Config) -> list[NumericItem]:
    """Window features are numerics computed upstream (add_window_features): they must be in the data."""
    out = []
    for wf in window_features(cfg):
        if wf.name not in cols.schema:
            raise DataContractError(
                f"column {wf.name!r} (a window feature) is missing: run features.windows.add_window_features first"
            )
        cols.need(wf.name, "float64", "features.velocity/rfm")
        out.append(NumericItem(wf.name, wf.transform, (0.001, 0.999) if wf.clip else None, None))
    return out


def _plan_categorical(cols: _Columns, cfg: Config) -> list[CategoricalItem]:
    """Configured categoricals: serving looks them up as strings or int64, so no other column type."""
    out = []
    for i, cs in enumerate(cfg.features.categorical_specs()):
        key = f"features.categorical[{i}]"
        s = cols.source(cs.column, key)
        dt = cols.schema[s]
        if isinstance(dt, T.StringType | T.BooleanType):
            dtype = "string"
        elif isinstance(dt, T.IntegralType):
            dtype = "int64"
        else:
            raise ConfigError(
                f"{key}: column {cs.column!r} is {dt.simpleString()}; a categorical must be a string, "
                "integer or boolean column"
            )
        cols.need(s, dtype, key)
        out.append(CategoricalItem(s, cs, dtype, *cols.cleaning(cs.column, s)))
    return out


def _plan_timestamps(cols: _Columns, cfg: Config) -> list[str]:
    """Timestamps become hour / day-of-week categoricals from int64 epoch seconds at serving."""
    out = []
    for i, raw in enumerate(cfg.features.timestamp):
        key = f"features.timestamp[{i}]"
        s = cols.source(raw, key)
        if not isinstance(cols.schema[s], T.TimestampType | T.TimestampNTZType | T.DateType | T.IntegralType):
            raise ConfigError(f"{key}: column {raw!r} is {cols.schema[s].simpleString()}, not a timestamp")
        cols.need(s, "int64", key)
        out.append(s)
    return out


def _plan_crosses(cols: _Columns, cfg: Config, categorical: list[CategoricalItem]) -> list[tuple[str, ...]]:
    """A cross combines the indices of configured categoricals: two or more of them, nothing else."""
    cat_sources = {c.source for c in categorical}
    out = []
    for i, cross in enumerate(cfg.features.crosses):
        if len(cross) < 2:
            raise ConfigError(f"features.crosses[{i}]: a cross needs at least two columns")
        srcs = []
        for j, raw in enumerate(cross):
            s = cols.names.get(raw)
            if s is None or s not in cat_sources:
                raise ConfigError(f"features.crosses[{i}][{j}]: column {raw!r} is not a categorical feature")
            srcs.append(s)
        out.append(tuple(srcs))
    return out


def _check_required(cols: _Columns, cfg: Config) -> None:
    """Besides the features, fit needs the label, the row id and (when configured) the weight."""
    if cfg.features.weight_column and "weight" not in cols.schema:
        raise DataContractError("column 'weight' (features.weight_column) is missing from the data")
    for c in ("label", "row_id"):
        if c not in cols.schema:
            raise DataContractError(f"column {c!r} is missing from the data given to FeatureState.fit")


# ---- fitting internals: the Spark passes, then pure assembly of the JSON entries ----------------------------
def _fitting(df: DataFrame, cfg: Config, plan: FitPlan, known: exact.Table | None,
             passes: Passes) -> Callable[[Counted], dict[str, Any]]:
    """Pass 1 (the quantiles) now, passes 2 and 3 (moments, vocabularies) added to ``passes``; the
    returned function assembles the fitted JSON from what they counted. Every pass is order-independent."""
    medians, bounds, extremes = _quantiles(df, plan.numeric, known)
    moments_of = _moments(plan, medians, bounds, extremes, passes)
    vocab = [c for c in plan.categorical if c.spec.encoding == "vocab"]
    passes.top_values(*[TopValues(f"vocab:{c.source}", _category_string(c.source, c.dtype, plan.strings),
                                  c.spec.min_count, c.spec.top_k) for c in vocab])

    def assemble(counted: Counted) -> dict[str, Any]:
        stats, moments = moments_of(counted.row)
        rows = int(stats["rows"])
        if rows == 0:
            raise DataContractError("the train split is empty: nothing to fit features on")
        numeric, flags = _numeric_entries(plan.numeric, stats, moments, medians, bounds)
        vocabs = {c.source: counted.tops[f"vocab:{c.source}"] for c in vocab}
        categorical = _categorical_entries(plan, stats, vocabs)
        crosses = _cross_entries(plan.crosses, categorical, cfg.features.cross_buckets)
        _check_unique_names([n["name"] for n in numeric] + [f["name"] for f in flags]
                            + [c["name"] for c in categorical] + [c["name"] for c in crosses])
        return {
            "version": VERSION, "numeric": numeric, "flags": flags, "categorical": categorical,
            "crosses": crosses, "raw_inputs": dict(plan.raw_inputs), "label": "label", "weight": plan.weight,
            "strings": dict(plan.strings), "window_features": list(plan.windows), "fitted_rows": rows,
        }

    return assemble


Quantiles = dict[str, float | None]


def _probs(n: NumericItem) -> set[float]:
    """The quantiles the fit reads of one numeric: its extremes, median and clip bounds."""
    return {0.0, 0.5, 1.0} | set(n.q or ())


def _quantiles(df: DataFrame, numeric: tuple[NumericItem, ...], known: exact.Table | None
               ) -> tuple[Quantiles, dict[str, list[float] | None], dict[str, tuple[float, float] | None]]:
    """Pass 1: every median (the default impute), clip bound and extreme (which scales the moments' sums),
    exact and order-independent (features/exact.py), all columns together (or read from ``known``)."""
    medians: Quantiles = {}
    bounds: dict[str, list[float] | None] = {}
    extremes: dict[str, tuple[float, float] | None] = {}
    if not numeric:
        return medians, bounds, extremes
    probs = sorted(set().union(*(_probs(n) for n in numeric)))
    srcs = list(dict.fromkeys(n.source for n in numeric))
    with timed(f"feature state: quantiles of {len(numeric)} numeric columns"):
        qs = exact.quantiles_of(known, df, {s: F.col(s) for s in srcs}, probs)
    for n in numeric:
        vals = dict(zip(probs, qs[n.source], strict=True)) if qs[n.source] else {}
        medians[n.source] = vals.get(0.5)
        bounds[n.source] = [vals[n.q[0]], vals[n.q[1]]] if n.q and vals else None
        extremes[n.source] = (vals[0.0], vals[1.0]) if vals else None
    return medians, bounds, extremes


@dataclass(frozen=True)
class _Scaled:
    """How one numeric column's moments are summed: around ``pivot``, in fixed point of ``bits`` /
    ``bits2`` (deviations / squared deviations); ``exact`` False where a value is not finite."""

    pivot: float
    bits: int
    bits2: int
    exact: bool


def _scaled(impute: float, clip: list[float] | None, transform: str, extreme: tuple[float, float] | None,
            median: float | None) -> _Scaled:
    """The pre-scaled value is monotone in the raw one (impute, clip, signed log1p), so its largest
    deviation from the pivot is at the raw extremes or the imputed value; a margin covers an ulp between
    Python's and the JVM's ``log1p``."""
    def pre(v: float) -> float:
        if clip is not None:
            v = min(max(v, clip[0]), clip[1])
        return math.copysign(math.log1p(abs(v)), v) if transform == "log1p" else v

    ends = [pre(v) for v in (*(extreme or ()), impute)]
    if not all(math.isfinite(v) for v in ends):
        return _Scaled(0.0, 0, 0, False)
    pivot = float(f"{pre(median if median is not None else impute):.9g}")  # near the mean, the same everywhere
    dev = max(abs(v - pivot) for v in ends) * (1 + 1e-9)
    if not math.isfinite(dev * dev):
        return _Scaled(0.0, 0, 0, False)
    return _Scaled(pivot, exact.scale_bits(dev), exact.scale_bits(dev * dev), True)


def _moments(
    plan: FitPlan, medians: Quantiles, bounds: dict[str, list[float] | None],
    extremes: dict[str, tuple[float, float] | None], passes: Passes,
) -> Callable[[Row | None], tuple[Row, list[tuple[float | None, float | None]]]]:
    """Pass 2, one aggregation: the row count; per numeric its null count (``z``), and the sums that give
    its mean and std after impute, clip and transform (fixed-point integers: the same whatever the row
    order, features/exact.py); and the value cleaning imputed where it imputed a statistic (``l`` numeric,
    ``cl`` categorical), each suffixed with the item's index in the plan, added to ``passes``. Returns
    the function that reads the row and per numeric (mean, std) from the aggregation's row."""
    aggs = [F.count(F.lit(1)).alias("rows")]
    scales: list[_Scaled] = []
    for i, n in enumerate(plan.numeric):
        s = n.source
        impute = medians[s] if medians[s] is not None else 0.0
        x = _pre_scale(s, impute, bounds[s], n.transform)
        sc = _scaled(impute, bounds[s], n.transform, extremes[s], medians[s])
        scales.append(sc)
        aggs.append(F.count(F.when(_missing(F.col(s).cast("double")), 1)).alias(f"z{i}"))
        if sc.exact:
            d = x - F.lit(sc.pivot)
            aggs += [*exact.sum_parts(d, sc.bits, f"d{i}"), *exact.sum_parts(d * d, sc.bits2, f"q{i}")]
        else:  # an infinite value, or squares beyond the double range (|x| > ~1e154): Spark's own moments,
            # which are not finite or not exact anyway (and there may depend on the row order)
            aggs += [F.avg(x).alias(f"m{i}"), F.stddev_pop(x).alias(f"s{i}")]
        if n.learn:
            flagged = F.coalesce(F.col(n.cleaning_flag).cast("int"), F.lit(0)) == 1
            aggs.append(F.max(F.when(flagged, F.col(s).cast("double"))).alias(f"l{i}"))
    for j, c in enumerate(plan.categorical):
        if c.learn:
            flagged = F.coalesce(F.col(c.cleaning_flag).cast("int"), F.lit(0)) == 1
            value = _category_string(c.source, c.dtype, plan.strings)
            aggs.append(F.max(F.when(flagged, value)).alias(f"cl{j}"))
    passes.aggregate(*aggs)

    def read(stats: Row | None) -> tuple[Row, list[tuple[float | None, float | None]]]:
        assert stats is not None  # a global aggregation has exactly one row
        rows = int(stats["rows"])
        moments: list[tuple[float | None, float | None]] = []
        for i, sc in enumerate(scales):
            if not sc.exact:
                moments.append((stats[f"m{i}"], stats[f"s{i}"]))
            elif rows == 0:
                moments.append((None, None))
            else:
                mean_d = exact.fixed_sum(stats, f"d{i}", sc.bits) / rows
                var = exact.fixed_sum(stats, f"q{i}", sc.bits2) / rows - mean_d * mean_d
                moments.append((sc.pivot + float(mean_d), math.sqrt(max(float(var), 0.0))))
        return stats, moments

    return read


def _numeric_entries(
    numeric: tuple[NumericItem, ...], stats: Row, moments: list[tuple[float | None, float | None]],
    medians: Quantiles, bounds: dict[str, list[float] | None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``numeric`` and ``flags`` entries of the JSON, from the pass 1 and 2 results."""
    out_num: list[dict[str, Any]] = []
    flags: list[dict[str, Any]] = []
    for i, n in enumerate(numeric):
        s = n.source
        # serving imputes what cleaning imputed (so a null at serving gets the training value), else
        # the train median
        impute = n.cleaning_value if n.cleaning_value is not None else stats[f"l{i}"] if n.learn else None
        if impute is None:
            impute = medians[s]
        if impute is None:
            LOG.warning("feature state: numeric column %r is null in every train row; imputing 0", s)
        scaled = n.transform in ("standardize", "log1p")
        mean, std = moments[i]
        ok_std = scaled and std is not None and math.isfinite(std) and std > 1e-12
        clip = bounds[s]
        out_num.append({
            "name": f"n__{s}", "source": s, "transform": n.transform,
            "impute": float(impute) if impute is not None else 0.0,
            "clip": [float(b) for b in clip] if clip else None,
            "mean": float(mean) if scaled and mean is not None else 0.0,
            "std": float(std) if ok_std else 1.0,
        })
        if n.cleaning_flag:  # cleaning imputed and flagged the nulls: the flag comes from there
            flags.append({"name": f"n__{s}__missing", "source": s, "cleaning_flag": n.cleaning_flag})
        elif n.flag or (n.flag is None and stats[f"z{i}"] > 0):
            flags.append({"name": f"n__{s}__missing", "source": s})
    return out_num, flags


def _categorical_entries(plan: FitPlan, stats: Row, vocabs: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The ``categorical`` entries of the JSON: the configured ones (vocab or hash), then each timestamp's
    hour and day of week."""
    out: list[dict[str, Any]] = []
    for j, c in enumerate(plan.categorical):
        cs, s = c.spec, c.source
        imputed = c.cleaning_value if c.cleaning_value is not None else stats[f"cl{j}"] if c.learn else None
        entry: dict[str, Any]
        if cs.encoding == "hash":
            entry = {"kind": "hash", "vocab": None, "buckets": cs.buckets, "cardinality": cs.buckets}
        else:
            vocab = vocabs.get(s, [])
            entry = {"kind": "vocab", "vocab": vocab, "buckets": None, "cardinality": len(vocab) + 1}
        out.append({"name": f"c__{s}", "sources": [s], **entry,
                    "embedding_dim": cs.embedding_dim or default_embedding_dim(entry["cardinality"]),
                    "impute": _normalize(imputed, c.dtype, plan.strings)})
    for s in plan.timestamps:
        for kind, card in (("hour", 25), ("dow", 8)):
            out.append({"name": f"c__{s}_{kind}", "sources": [s], "kind": kind, "vocab": None,
                        "buckets": None, "cardinality": card, "embedding_dim": default_embedding_dim(card)})
    return out


def _cross_entries(
    crosses: tuple[tuple[str, ...], ...], categorical: list[dict[str, Any]], cross_buckets: int
) -> list[dict[str, Any]]:
    """The ``crosses`` entries: exact when the product of the sources' cardinalities fits ``cross_buckets``,
    else hashed into that many (each source below 2^32, so the hash never overflows int64)."""
    card = {c["name"]: c["cardinality"] for c in categorical}
    out = []
    for srcs in crosses:
        cols = [f"c__{s}" for s in srcs]
        cards = [card[c] for c in cols]
        if any(k >= _MAX_CARD for k in cards):
            raise ConfigError(f"features.crosses: a source of {cols} has more than 2^32 categories")
        product = math.prod(cards)
        exact = product <= cross_buckets
        out.append({"name": "c__" + "_x_".join(srcs), "sources": cols, "cardinalities": cards,
                    "kind": "exact" if exact else "hash", "cardinality": product if exact else cross_buckets})
    return out


def _check_unique_names(names: list[str]) -> None:
    """Shard columns are named after their sources: two features must not end up with one name (a
    categorical listed twice, or one named like a timestamp's ``<ts>_hour`` part, would overwrite the
    other's column). Checked on the plan before any Spark pass, and again on the fitted names (the
    missing flags depend on the data)."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"features: two features would both be named {dup[0]!r}")


# ---- file systems -------------------------------------------------------------------------------------
def _hadoop(path: str) -> HadoopFS:
    """The driver's Hadoop view, for URLs that are not this machine's files (Spark's credentials)."""
    spark = SparkSession.getActiveSession()
    if spark is None:
        raise ConfigError(f"{path}: a non-local URL needs an active SparkSession (its Hadoop file systems)")
    return HadoopFS(spark)
