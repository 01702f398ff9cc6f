"""Entity history: the past events that window features need, so new rows are scored as training saw them.

A velocity or RFM value of a row depends on the earlier events of its entity. Scoring a new file on its
own would make every entity's first new event look like its first event ever (zero counts, first
device, no time since the previous event): training/serving skew in the features the model leans on
most. ``prepare`` therefore publishes, with every data version, the events the windows can still see
(:func:`trim`), and ``score`` computes the windows over that history plus the new rows
(:func:`score_frame`), keeping only the new rows.

What is kept (bounded by the window horizon and by the number of entities and values, never by the
length of the data):

- every event within the longest window before the end of the data (the bounded windows);
- per velocity entity, its last event (time since the previous event);
- per (first entity, device) and (first entity, country), the last event (first-time flags);
- per RFM entity, its first event (tenure without a signup column) and its last active event (recency).

Every kept row is a real, cleaned event (hashed like the shards, no PII), so the windows engine treats
it exactly as it treated it in ``prepare``: for any row later than the history's end, the window values
equal those computed over the whole past (``tests/test_history.py`` checks this against the untrimmed
computation). A row older than the history's end may have lost context to the trim: that is an overlap,
reported as such by ``score``.

A history dataset is Parquet (``HID`` + the columns the windows read, safe names) with ``_history.json``
beside the files: end of the data, horizon, rows, columns. ``score --history-out`` writes the same
format, rolled forward over the scored rows.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour.config import Config
from downpour.errors import DataContractError
from downpour.features.windows import _windows, epoch_us, referenced_columns

HID = "_dp_hid"  # the event's identity: the id column, else a hash of the columns the windows read
CONTEXT = "_dp_history_context"  # True on history rows while they are unioned with the rows to score
META = "_history.json"  # Spark and pyarrow skip files starting with "_" when they read the Parquet
FORMAT = 1
_US = 1_000_000


@dataclass(frozen=True)
class HistoryInfo:
    """What ``_history.json`` records about a history dataset (the manifest and score summary too)."""

    end: str | None  # ISO time of the latest event (UTC); None when empty
    end_us: int | None
    horizon_seconds: int
    rows: int
    columns: list[str]
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HistoryInfo:
        return cls(**{k: d.get(k) for k in ("end", "end_us", "horizon_seconds", "rows", "columns")},
                   format=int(d.get("format", FORMAT)))


def needed(cfg: Config) -> bool:
    """True when the config computes window features (only those need a history)."""
    return bool(cfg.features.velocity.enabled or cfg.features.rfm.enabled)


def horizon_seconds(cfg: Config) -> int:
    """The longest window of the config: how far back a bounded window can reach."""
    spans = []
    if cfg.features.velocity.enabled:
        spans += [s for _, s in _windows(cfg.features.velocity.windows)]
    if cfg.features.rfm.enabled:
        spans += [s for _, s in _windows(cfg.features.rfm.windows)]
    return max(spans) if spans else 0


def columns(cfg: Config) -> list[str]:
    """The safe-named columns the windows read: event time first, then entities and values."""
    names = cfg.names
    ts = names[cfg.timestamp_column] if cfg.timestamp_column else None
    return list(dict.fromkeys([c for c in [ts, *referenced_columns(cfg)] if c]))


def identity(df: DataFrame, cfg: Config) -> Column:
    """The same event gets the same identity in prepare, in a history file and in a scoring input.

    The id column when the config has one. Without it, SHA-256 over every declared column but the label
    (scoring inputs have none) as parsed and cleaned (PII pseudonymised), times as epoch microseconds
    (independent of the session time zone): two events identical in all of these count as one."""
    names = cfg.names
    if cfg.id_column:
        return F.col(names[cfg.id_column]).cast("string")
    values = []
    for raw, typ in cfg.schema_.items():
        if raw == cfg.label.column or raw in cfg.pii.drop or names[raw] not in df.columns:
            continue
        c = F.col(names[raw])
        if typ == "timestamp":
            c = F.unix_micros(c.cast("timestamp"))
        elif typ == "date":
            c = F.unix_date(c)
        values.append(c.cast("string"))
    return F.sha2(F.to_json(F.array(*values)), 256)


def events(clean: DataFrame, cfg: Config) -> DataFrame:
    """Clean rows -> history rows (``HID`` + :func:`columns`); rows without an event time are no events."""
    names = cfg.names
    cols = columns(cfg)
    ts = names[cfg.timestamp_column]  # type: ignore[index]
    return clean.select(identity(clean, cfg).alias(HID), *cols).where(F.col(ts).isNotNull())


@dataclass(frozen=True)
class Keeper:
    """State rows the bounded windows alone would lose: per ``keys``, the first event (``first``) or the
    last one (with ``active``: the last whose column is > 0), and for ``last`` also the last strictly
    before the end, which a new row at exactly the end time needs (velocity windows exclude equal times)."""

    name: str
    keys: tuple[str, ...]
    first: bool = False
    active: str | None = None


def keepers(cfg: Config) -> list[Keeper]:
    """What :func:`trim` keeps besides the horizon, for this config's window features."""
    names = cfg.names
    vel, rfm = cfg.features.velocity, cfg.features.rfm
    out: list[Keeper] = []
    if vel.enabled:
        for i, raw in enumerate(vel.entities):
            e = names[raw]
            out.append(Keeper(f"last event per {raw}", (e,)))  # time since the previous event
            for extra in (vel.device_column, vel.country_column) if i == 0 else ():
                if extra:  # first-time device / country flags
                    out.append(Keeper(f"last event per {raw} and {extra}", (e, names[extra])))
    if rfm.enabled:
        e = names[rfm.entity]  # type: ignore[index]
        out.append(Keeper(f"first event per {rfm.entity}", (e,), first=True))  # tenure
        active = rfm.frequency_column or rfm.amount_column
        if active:  # recency
            out.append(Keeper(f"last active event per {rfm.entity}", (e,), active=names[active]))
    return out


def trim(history: DataFrame, cfg: Config, end_us: int) -> DataFrame:
    """The rows of ``history`` that any event after ``end_us`` can still see (see the module docstring).

    Lazy. Every keeper is served by one map-side combined aggregation that carries the picked row itself:
    ``max``/``min`` of ``struct(time, HID, row)`` is the latest (earliest) event, ties broken by ``HID``,
    so the pick is deterministic and needs no join back to the history. One event per key and pick is
    all a later row's windows read from outside the horizon (a time, or that the key was seen). The
    keepers share that aggregation: each event is listed once per keeper it counts for, under
    ``(keeper, its key values)``, so the history is scanned once and shuffled once, whatever the
    number of keepers."""
    names = cfg.names
    ts = names[cfg.timestamp_column]  # type: ignore[index]
    t = epoch_us(history, ts, "timestamp_column", "the history")
    out = history.where(t >= F.lit(end_us - horizon_seconds(cfg) * _US))
    kept = keepers(cfg)
    if kept:
        out = out.unionByName(_picked(history, kept, t, end_us))
    return out.dropDuplicates([HID]).select(*history.columns)


def _picked(history: DataFrame, kept: list[Keeper], t: Column, end_us: int) -> DataFrame:
    """The keepers' picks from one aggregation: the group is ``(keeper index, key)``, the key a struct of
    every keeper's key columns (their own types) with the columns a keeper does not use left null."""
    types = {f.name: f.dataType for f in history.schema.fields}
    key_cols = list(dict.fromkeys(c for k in kept for c in k.keys))
    entries = []
    for i, k in enumerate(kept):
        present = F.lit(True)
        for key in k.keys:
            present = present & F.col(key).isNotNull()
        if k.active:
            present = present & (F.col(k.active).cast("double") > 0)
        key = F.struct(*[(F.col(c) if c in k.keys else F.lit(None).cast(types[c])).alias(c) for c in key_cols])
        entries.append(F.when(present, F.struct(F.lit(i).alias("k"), key.alias("key"))))
    row = F.struct(t.alias("__t"), F.col(HID), *[c for c in history.columns if c != HID])
    listed = history.select(F.explode(F.array(*entries)).alias("__g"), row.alias("__row"))
    listed = listed.where(F.col("__g").isNotNull())
    first = F.col("__g.k").isin([i for i, k in enumerate(kept) if k.first] or [-1])
    r = F.col("__row")
    picks = (listed.groupBy("__g")
             .agg(F.min(F.when(first, r)).alias("__first"),
                  F.max(F.when(~first, r)).alias("__last"),  # the last event, and the last strictly
                  F.max(F.when(~first & (F.col("__row.__t") < F.lit(end_us)), r)).alias("__before")))  # before the end
    return (picks.select(F.explode(F.array("__first", "__last", "__before")).alias("__r"))
            .where(F.col("__r").isNotNull())
            .select(*[F.col(f"__r.{c}").alias(c) for c in history.columns]))


def before(history: DataFrame, cfg: Config, us: int) -> DataFrame:
    """The events of ``history`` strictly before ``us`` (epoch microseconds)."""
    names = cfg.names
    ts = names[cfg.timestamp_column]  # type: ignore[index]
    return history.where(epoch_us(history, ts, "timestamp_column", "the history") < F.lit(us))


def span(df: DataFrame, cfg: Config, where: Column | None = None) -> tuple[
        int | None, int | None, int]:
    """(first event, last event in epoch microseconds, rows) of ``df`` in one aggregation."""
    names = cfg.names
    ts = names[cfg.timestamp_column]  # type: ignore[index]
    t = epoch_us(df, ts, "timestamp_column", cfg.input.path)
    if where is not None:
        t = F.when(where, t)
        n = F.sum(F.when(where, 1).otherwise(0))
    else:
        n = F.count(F.lit(1))
    row = df.agg(F.min(t).alias("lo"), F.max(t).alias("hi"), n.alias("n")).collect()[0]
    return row["lo"], row["hi"], int(row["n"] or 0)


def iso(us: int | None) -> str | None:
    if us is None:
        return None
    stamp = dt.datetime.fromtimestamp(us / _US, dt.UTC).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def info(cfg: Config, end_us: int | None, rows: int) -> HistoryInfo:
    return HistoryInfo(end=iso(end_us), end_us=end_us, horizon_seconds=horizon_seconds(cfg), rows=rows,
                       columns=[HID, *columns(cfg)])


def write(history: DataFrame, url: str, cfg: Config, end_us: int | None) -> HistoryInfo:
    """Write ``history`` (Parquet) and then ``_history.json`` into ``url``, a staging directory: the
    caller publishes it atomically (with the data version, or as the new version of a store)."""
    from downpour import storage

    history.write.mode("overwrite").parquet(spark_url(url))
    rows = history.sparkSession.read.parquet(spark_url(url)).count()  # the footers of what was written
    meta = info(cfg, end_us, rows)
    storage.write_json_atomic(storage.join(url, META), meta.to_dict())
    return meta


def is_history(url: str) -> bool:
    """True when ``url`` is a history dataset (written by prepare or ``score --history-out``)."""
    from downpour import storage

    return storage.exists(storage.join(url, META))


def read(spark: SparkSession, url: str, cfg: Config) -> tuple[DataFrame, HistoryInfo]:
    """A history dataset and its ``_history.json``; its columns must be the ones this config's windows read."""
    from downpour import storage

    # a published store is a symlink: read the version it points at now, whatever is published next
    root = url if storage.scheme(url) == "dbfs" else storage.resolve(url)
    meta = HistoryInfo.from_dict(storage.read_json(storage.join(root, META)))
    if int(meta.horizon_seconds or 0) < horizon_seconds(cfg):
        raise DataContractError(
            f"history {url}: it keeps {meta.horizon_seconds}s of events, the longest window of this config is "
            f"{horizon_seconds(cfg)}s; windows would miss events; rebuild it with this config")
    wanted = [HID, *columns(cfg)]
    if meta.columns != wanted:
        missing = [c for c in wanted if c not in meta.columns]
        raise DataContractError(
            f"history {url}: it holds columns {meta.columns}, the window features of this config read "
            f"{wanted}{f' (missing {missing[0]!r})' if missing else ''}; rebuild it with this config")
    return spark.read.parquet(spark_url(root)).select(*wanted), meta


def spark_url(url: str) -> str:
    """The URL Spark must get: a local path qualified as ``file://`` (else Spark resolves it against the
    cluster's default file system, e.g. HDFS on YARN); ``dbfs:``, ``hdfs://``, ``s3a://`` as given."""
    from downpour import storage

    s = storage.scheme(url)
    return "file://" + storage.local_path(url) if s in ("", "file") else str(url)


def combine(parts: list[DataFrame]) -> DataFrame | None:
    """One history from several (published, ``--history`` files, a store): an event counts once."""
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out.dropDuplicates([HID]) if len(parts) > 1 else out


def with_context(rows: DataFrame, history: DataFrame | None) -> DataFrame:
    """``rows`` (with ``HID``) plus the history rows not among them, marked ``CONTEXT``: the frame the
    windows run over. A history row with the id of a row to score is that row: it counts once."""
    targets = rows.withColumn(CONTEXT, F.lit(False))
    if history is None:
        return targets
    ctx = history.join(rows.select(HID).distinct(), HID, "left_anti").withColumn(CONTEXT, F.lit(True))
    return targets.unionByName(ctx, allowMissingColumns=True)


def with_every_event(rows: DataFrame, history: DataFrame | None) -> DataFrame:
    """``rows`` plus every history row, copies of ``rows`` included: a superset of :func:`with_context`
    without its anti-join, for what only needs an upper bound (the hot-key count: a row counted twice can
    only split more keys, which never changes a value)."""
    return rows if history is None else rows.unionByName(history, allowMissingColumns=True)


def drop_context(windowed: DataFrame) -> DataFrame:
    """The rows to score again, after the windows ran over them and their history."""
    return windowed.where(~F.col(CONTEXT)).drop(CONTEXT)


def describe_gap(gap_seconds: float) -> str:
    """'3d 4h 0m' for the log and error messages."""
    s = int(abs(gap_seconds))
    d, rem = divmod(s, 86_400)
    h, rem = divmod(rem, 3_600)
    return f"{d}d {h}h {rem // 60}m"


def dumps(meta: HistoryInfo) -> str:
    return json.dumps(meta.to_dict())
