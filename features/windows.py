"""Point-in-time window features as Spark window jobs: fraud velocity and CRM recency/frequency/monetary.

Every value of a row is computed from the history of its entity *as of that row's event time*, so the
same row gets the same value whichever split it lands in and nothing from its future leaks in:

- velocity (``features.velocity``): event-time RANGE windows ``[t - w, t)`` over *strictly earlier*
  events (an event with an equal timestamp is not in the window, so two events of one second do not see
  each other), the time since the previous strictly earlier event, the amount over the trailing mean of
  the largest window, and first-time device / country flags for the first entity;
- RFM (``features.rfm``): windows ``(t - w, t]`` over snapshot rows *up to and including* the row (a
  monthly snapshot summarises the month that ends at its date), recency of the last active row,
  tenure, and the engagement trend (rate in the shortest window over the rate in the rest of the
  longest window).

Cost: one shuffle per entity. All windows of an entity, including the first-time flags (a window
partitioned by entity *and* device, which the entity's hash partitioning already satisfies), run on
that one exchange.

Skew. Ordered windows cannot be salted: a random salt would scatter one entity's history over tasks and
each task would see only part of it. Windows are therefore keyed by the entity only (never by a
high-cardinality, low-skew column such as the merchant when the card is the entity), and Spark's AQE
coalesces the small partitions. A key with more than ``hot_key_rows`` rows (found in one aggregation
pass before the windows run) has its history split into time buckets of ``hot_key_bucket`` (default:
the largest window): each bucket is its own window partition, and the rows of the previous ``largest
window`` are copied into it as read-only context, so every bounded window sees exactly the events it
would see unsplit. The unbounded look-backs (time since the previous event, first-time device /
country, recency) take the in-bucket value, or else the last event of the earlier buckets from a small
per-bucket aggregate (broadcast). Tenure without a signup date uses a map-side combined ``groupBy`` +
join, which AQE's skew-join handling splits. See DEVELOPERS.md "Window features and hot keys".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, Window, WindowSpec
from pyspark.sql import functions as F
from pyspark.sql import types as T

from downpour.config import Config, parse_duration
from downpour.errors import ConfigError, DataContractError
from downpour.logs import LOG, timed

_US = 1_000_000  # window arithmetic runs on event time in epoch microseconds
_DAY_US = 86_400 * _US
_T = "__wf_t"  # event time, epoch microseconds
_B = "__wf_b"  # window partition bucket (-1: whole history; >= 0: hot-key time bucket; <= -2: no entity)
_TGT = "__wf_target"  # False for context rows copied from the previous bucket
_NULL_SPREAD = 1024  # rows without an entity/time are spread over this many partitions (values are null)


@dataclass(frozen=True)
class WindowFeature:
    """One numeric column added by :func:`add_window_features`, and how FeatureState should treat it.

    ``FeatureState`` adds a missing-value flag for it when the train split has nulls in it (the first
    event of an entity has no "time since previous", a row without an entity has no history).
    """

    name: str
    transform: str  # "log1p" (counts, sums, durations, ratios) | "standardize" | "none" (0/1 flags)
    clip: bool = True


def _label(window: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", window.strip().lower()).strip("_")


def _windows(spec: list[str]) -> list[tuple[str, int]]:
    """``["1h", "7d"]`` -> ``[("1h", 3600), ("7d", 604800)]`` (deduplicated, config order)."""
    out: dict[str, int] = {}
    for w in spec:
        out.setdefault(_label(w), parse_duration(w))
    return list(out.items())


def _col(names: dict[str, str], raw: str | None, key: str) -> str | None:
    if raw is None:
        return None
    if raw not in names:
        raise ConfigError(f"{key}: column {raw!r} is not in the schema")
    return names[raw]


def window_features(cfg: Config) -> list[WindowFeature]:
    """The numeric columns :func:`add_window_features` adds for this config, in order."""
    names = cfg.names
    out: list[WindowFeature] = []
    vel, rfm = cfg.features.velocity, cfg.features.rfm
    if vel.enabled:
        wins = _windows(vel.windows)
        for i, raw in enumerate(vel.entities):
            e = _col(names, raw, f"features.velocity.entities[{i}]")
            for label, _ in wins:
                out.append(WindowFeature(f"vel_{e}_count_{label}", "log1p"))
                if vel.amount_column:
                    out.append(WindowFeature(f"vel_{e}_sum_{label}", "log1p"))
            out.append(WindowFeature(f"vel_{e}_secs_since_prev", "log1p"))
            if i == 0:
                if vel.amount_column:
                    longest = max(wins, key=lambda x: x[1])[0]
                    out.append(WindowFeature(f"vel_{e}_amount_over_mean_{longest}", "log1p"))
                if vel.device_column:
                    out.append(WindowFeature(f"vel_{e}_first_device", "none", clip=False))
                if vel.country_column:
                    out.append(WindowFeature(f"vel_{e}_first_country", "none", clip=False))
    if rfm.enabled:
        wins = _windows(rfm.windows)
        out.append(WindowFeature("rfm_tenure_days", "standardize"))
        if rfm.frequency_column or rfm.amount_column:
            out.append(WindowFeature("rfm_recency_days", "log1p"))
        for label, _ in wins:
            out.append(WindowFeature(f"rfm_frequency_{label}", "log1p"))
            if rfm.amount_column:
                out.append(WindowFeature(f"rfm_monetary_{label}", "log1p"))
        if len(wins) >= 2:
            short, long_ = min(wins, key=lambda x: x[1])[0], max(wins, key=lambda x: x[1])[0]
            out.append(WindowFeature(f"rfm_trend_{short}_{long_}", "log1p"))
    return out


# ---- the public stage --------------------------------------------------------------------------------
def add_window_features(df: DataFrame, cfg: Config, rows: int | None = None,
                        count_over: DataFrame | None = None) -> DataFrame:
    """``df`` plus the velocity / RFM columns of :func:`window_features`; a no-op when neither is on.

    ``df`` has the safe column names of ``cfg.names``. Run it on the cleaned data *before* the split
    (windows need each entity's whole history). It runs one job at once (the hot-key count;
    ``hot_key_rows: null`` skips it) and otherwise stays lazy: one shuffle per entity. Persist ``df``
    first if it is expensive to recompute: the hot-key count reads it once more (or ``count_over``),
    and so do the hot-key context rows and RFM tenure without a signup date.

    ``rows``: an upper bound on ``df``'s rows, where the caller has counted them already. No key can have
    more rows than that, so an entity whose ``hot_key_rows`` is not below it is not counted, and when no
    entity is, the count's pass is skipped. (Splitting a key into time buckets never changes a value, so
    a wrong bound costs skew, not correctness.)

    ``count_over``: a frame holding every entity value of ``df``'s rows (and possibly more) that is
    cheaper to read, to count the keys over instead of ``df``; ``rows`` then bounds its rows. Counting
    more rows can only split more keys, for the same reason.
    """
    names = cfg.names
    vel, rfm = cfg.features.velocity, cfg.features.rfm
    if not (vel.enabled or rfm.enabled):
        return df
    if not cfg.timestamp_column:
        raise ConfigError("timestamp_column: window features need an event-time column")
    ts = _col(names, cfg.timestamp_column, "timestamp_column")
    features = window_features(cfg)
    clash = sorted({f.name for f in features} & set(df.columns))
    if clash:
        raise DataContractError(
            f"column {clash[0]!r} in {cfg.input.path}: the name is reserved for a window feature"
        )
    for c in [ts, *referenced_columns(cfg)]:
        if c not in df.columns:
            raise DataContractError(
                f"column {c!r} is missing from the data of {cfg.input.path} (needed by window features)"
            )
    original = df.columns
    out = df.withColumn(_T, epoch_us(df, ts, "timestamp_column", cfg.input.path))

    plans: list[tuple[str, int | None]] = []
    if vel.enabled:
        plans += [(names[e], vel.hot_key_rows) for e in vel.entities]
    if rfm.enabled:
        plans.append((names[rfm.entity], rfm.hot_key_rows))  # type: ignore[index]
    lacking = [e for e, _ in plans if count_over is not None and e not in count_over.columns]
    if lacking:  # a caller's mistake, not the data's: the frame to count over must hold every entity
        raise ValueError(f"count_over has no column {lacking[0]!r}: it must hold every entity column")
    hot = _hot_keys(out if count_over is None else count_over, plans, rows, over_more=count_over is not None)

    spread = [f.name for f in df.schema if isinstance(f.dataType, T.AtomicType)] + [_T]
    if vel.enabled:
        out = _velocity(out, cfg, hot, spread)
    if rfm.enabled:
        out = _rfm(out, cfg, hot, spread)
    LOG.info(
        "window features: %d columns (velocity=%s, rfm=%s), %d hot key(s) split into time buckets",
        len(features), vel.enabled, rfm.enabled, sum(len(v) for v in hot.values()),
    )
    return out.select(*original, *[f.name for f in features])


def referenced_columns(cfg: Config) -> list[str]:
    """The safe-named columns the windows read besides the event time (entities, amounts, values)."""
    names = cfg.names
    vel, rfm = cfg.features.velocity, cfg.features.rfm
    raw: list[str | None] = []
    if vel.enabled:
        raw += [*vel.entities, vel.amount_column, vel.device_column, vel.country_column]
    if rfm.enabled:
        raw += [rfm.entity, rfm.amount_column, rfm.signup_column, rfm.frequency_column]
    return [names[r] for r in raw if r is not None]


def epoch_us(df: DataFrame, col: str, key: str, source: str) -> Column:
    """Event time as epoch microseconds (UTC): timestamps, dates, or integers holding epoch seconds."""
    dtype = df.schema[col].dataType
    if isinstance(dtype, T.TimestampType | T.TimestampNTZType):
        return F.unix_micros(F.col(col).cast("timestamp"))
    if isinstance(dtype, T.DateType):
        return F.unix_date(F.col(col)).cast("long") * F.lit(_DAY_US)
    if isinstance(dtype, T.IntegralType):
        return F.col(col).cast("long") * F.lit(_US)
    raise DataContractError(
        f"column {col!r} ({key}) in {source} has type {dtype.simpleString()}: "
        "window features need a timestamp, a date or integer epoch seconds"
    )


def _hot_keys(df: DataFrame, plans: list[tuple[str, int | None]], rows: int | None = None,
              over_more: bool = False) -> dict[int, list[str]]:
    """Keys with more rows than their threshold, for every planned entity, in ONE aggregation pass.

    Returns plan index -> key values (as strings). The keys stay on the driver and are never logged
    (an entity may be a hashed PII column). ``rows`` (an upper bound on ``df``'s rows) leaves out the
    entities whose threshold no key can exceed. ``over_more``: ``df`` is a caller's ``count_over``,
    which may hold a row more than once, so the warning says the rows were counted there.
    """
    active = [(i, c, n) for i, (c, n) in enumerate(plans) if n is not None and (rows is None or rows > n)]
    if not active:
        if rows is not None and any(n is not None for _, n in plans):
            LOG.info("window features: %d rows, no more than any entity's hot_key_rows: no hot-key count", rows)
        return {}
    pairs = F.explode(
        F.array(*[F.struct(F.lit(i).alias("p"), F.col(c).cast("string").alias("k")) for i, c, _ in active])
    )
    limit = F.lit(None).cast("long")
    for i, _, n in active:
        limit = F.when(F.col("p") == i, F.lit(n)).otherwise(limit)
    with timed("window features: counting rows per entity to find hot keys"):
        found = (
            df.select(pairs.alias("e")).select("e.p", "e.k").where(F.col("k").isNotNull())
            .groupBy("p", "k").count().where(F.col("count") > limit).select("p", "k").collect()
        )
    hot: dict[int, list[str]] = {}
    for r in found:
        hot.setdefault(r["p"], []).append(r["k"])
    for i, keys in hot.items():
        LOG.warning(
            "window features: %d hot key(s) in %r (> %d rows%s) are split into time buckets",
            len(keys), plans[i][0], plans[i][1],
            " counted over the rows and their history, where an event may count twice" if over_more else "",
        )
    return hot


# ---- the windowing engine ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Last:
    """The time of the last event at or before a row, per entity (and ``by`` value, if set).

    ``pred`` None counts every event; ``inclusive`` counts the row itself (and rows of equal time).
    """

    pred: Column | None = None
    inclusive: bool = False
    by: str | None = None


@dataclass
class _Pass:
    """One window pass over one entity."""

    entity: str
    frames: Callable[[WindowSpec], dict[str, Column]]  # window columns, given the partitioned spec
    max_us: int  # the largest window: how much history a hot-key bucket copies from the previous one
    bucket_us: int
    hot: list[str] = field(default_factory=list)
    spread: list[str] = field(default_factory=list)  # input columns hashed to spread entity-less rows
    lasts: dict[str, _Last] = field(default_factory=dict)  # -> column "__last_<name>" (null: none)


def _windowed(df: DataFrame, p: _Pass) -> DataFrame:
    """``df`` plus the columns of ``p.frames`` and ``__last_*``, computed per entity in event-time order.

    One shuffle by (entity, bucket): the ``__last_*`` windows partition by (entity, bucket, by), which
    the same hash partitioning already satisfies, so they cost a sort, not another exchange.
    """
    ent, t = F.col(p.entity), F.col(_T)
    valid = ent.isNotNull() & t.isNotNull()
    is_hot = ent.cast("string").isin(p.hot) if p.hot else F.lit(False)
    # hash plain input columns only: hashing derived columns would inline their whole expressions
    spread = F.lit(-2) - F.pmod(F.xxhash64(*[F.col(c) for c in p.spread]), F.lit(_NULL_SPREAD))
    bucket = F.when(~valid, spread).when(is_hot, F.floor(t / F.lit(p.bucket_us))).otherwise(F.lit(-1))
    targets = df.withColumn(_B, bucket.cast("long")).withColumn(_TGT, F.lit(True))
    rows = targets
    if p.hot:
        # rows of a hot key within `max_us` of the next bucket's start are that bucket's context too
        ctx = targets.where(valid & is_hot & (t >= (F.col(_B) + 1) * F.lit(p.bucket_us) - F.lit(p.max_us)))
        rows = targets.unionByName(ctx.withColumn(_B, F.col(_B) + 1).withColumn(_TGT, F.lit(False)))

    cols = p.frames(Window.partitionBy(p.entity, _B).orderBy(_T))
    for name, last in p.lasts.items():
        keys = [p.entity, _B] + ([last.by] if last.by else [])
        frame = Window.partitionBy(*keys).orderBy(_T).rangeBetween(
            Window.unboundedPreceding, 0 if last.inclusive else -1
        )
        cols[f"__last_{name}"] = F.max(t if last.pred is None else F.when(last.pred, t)).over(frame)
    out = rows.select("*", *[F.when(valid, c).alias(n) for n, c in cols.items()]).where(F.col(_TGT))

    if p.hot:
        # the last event before a hot bucket may lie before the copied context: take it from the
        # running max over the earlier buckets (one small row per hot key, `by` value and bucket)
        for name, last in p.lasts.items():
            keys = [p.entity] + ([last.by] if last.by else [])
            when_t = t if last.pred is None else F.when(last.pred, t)
            per_bucket = targets.where(valid & is_hot).groupBy(*keys, _B).agg(F.max(when_t).alias("__bl"))
            earlier = Window.partitionBy(*keys).orderBy(_B).rowsBetween(Window.unboundedPreceding, -1)
            prior = per_bucket.select(*keys, _B, F.max("__bl").over(earlier).alias("__pr"))
            out = out.join(F.broadcast(prior), [*keys, _B], "left")
            out = out.withColumn(f"__last_{name}", F.coalesce(F.col(f"__last_{name}"), F.col("__pr")))
            out = out.drop("__pr")
    return out.drop(_B, _TGT)


def _first_seen(df: DataFrame, source: DataFrame, keys: list[str], alias: str) -> DataFrame:
    """``df`` plus the earliest event time in ``source`` of its ``keys`` combination.

    An aggregate (combined map-side, so a hot key costs one row per task) joined back, which AQE's
    skew-join handling splits when a key is hot. ``source`` is the input before the window passes, so
    the aggregate does not depend on (and recompute) them.
    """
    first = source.where(F.col(_T).isNotNull()).groupBy(*keys).agg(F.min(_T).alias(alias))
    return df.join(first, keys, "left")


def _bucket_us(windows: list[tuple[str, int]], bucket: str | None) -> tuple[int, int]:
    max_us = max(s for _, s in windows) * _US
    return max_us, max(max_us, parse_duration(bucket) * _US if bucket else max_us)


# ---- fraud velocity ------------------------------------------------------------------------------------
def _velocity(
    df: DataFrame, cfg: Config, hot: dict[int, list[str]], spread: list[str]
) -> DataFrame:
    names = cfg.names
    vel = cfg.features.velocity
    wins = _windows(vel.windows)
    max_us, bucket_us = _bucket_us(wins, vel.hot_key_bucket)
    amount = names[vel.amount_column] if vel.amount_column else None
    longest = max(wins, key=lambda x: x[1])[0]
    t = F.col(_T)
    firsts = [(k, c) for k, c in (("device", vel.device_column), ("country", vel.country_column)) if c]
    for i, raw in enumerate(vel.entities):
        e = names[raw]

        def frames(w: WindowSpec, e: str = e) -> dict[str, Column]:
            out: dict[str, Column] = {}
            for label, secs in wins:
                frame = w.rangeBetween(-secs * _US, -1)  # [t - w, t): strictly earlier events only
                out[f"vel_{e}_count_{label}"] = F.count(F.lit(1)).over(frame).cast("double")
                if amount:
                    amt = F.col(amount).cast("double")
                    out[f"vel_{e}_sum_{label}"] = F.coalesce(F.sum(amt).over(frame), F.lit(0.0))
            return out

        lasts = {"prev": _Last()}
        if i == 0:  # first-time flags: no strictly earlier event of this entity with the same value
            lasts.update({k: _Last(by=names[c]) for k, c in firsts})
        df = _windowed(df, _Pass(e, frames, max_us, bucket_us, hot.get(i, []), spread, lasts))
        since = ((t - F.col("__last_prev")) / F.lit(_US)).cast("double")
        df = df.withColumn(f"vel_{e}_secs_since_prev", since).drop("__last_prev")
        if i == 0:
            if amount:
                cnt, tot = F.col(f"vel_{e}_count_{longest}"), F.col(f"vel_{e}_sum_{longest}")
                ratio = F.when((cnt > 0) & (tot > 0), F.col(amount).cast("double") * cnt / tot)
                df = df.withColumn(f"vel_{e}_amount_over_mean_{longest}", ratio)
            for key, raw_col in firsts:
                c = names[raw_col]
                known = F.col(e).isNotNull() & F.col(c).isNotNull() & t.isNotNull()
                flag = F.when(known, F.when(F.col(f"__last_{key}").isNull(), 1.0).otherwise(0.0))
                df = df.withColumn(f"vel_{e}_first_{key}", flag).drop(f"__last_{key}")
    return df


# ---- CRM recency / frequency / monetary ------------------------------------------------------------------
def _rfm(
    df: DataFrame, cfg: Config, hot: dict[int, list[str]], spread: list[str]
) -> DataFrame:
    names = cfg.names
    rfm = cfg.features.rfm
    plan_index = len(cfg.features.velocity.entities) if cfg.features.velocity.enabled else 0
    wins = _windows(rfm.windows)
    max_us, bucket_us = _bucket_us(wins, rfm.hot_key_bucket)
    e = names[rfm.entity]  # type: ignore[index]
    amount = F.col(names[rfm.amount_column]).cast("double") if rfm.amount_column else None
    freq = F.col(names[rfm.frequency_column]).cast("double") if rfm.frequency_column else None
    t = F.col(_T)
    source = df

    def frames(w: WindowSpec) -> dict[str, Column]:
        out: dict[str, Column] = {}
        for label, secs in wins:
            frame = w.rangeBetween(-(secs * _US - 1), 0)  # (t - w, t]: up to and including this snapshot
            if freq is not None:
                out[f"rfm_frequency_{label}"] = F.coalesce(F.sum(freq).over(frame), F.lit(0.0))
            else:
                out[f"rfm_frequency_{label}"] = F.count(F.lit(1)).over(frame).cast("double")
            if amount is not None:
                out[f"rfm_monetary_{label}"] = F.coalesce(F.sum(amount).over(frame), F.lit(0.0))
        return out

    active = freq if freq is not None else amount
    lasts = {"active": _Last(active > 0, inclusive=True)} if active is not None else {}
    df = _windowed(df, _Pass(e, frames, max_us, bucket_us, hot.get(plan_index, []), spread, lasts))
    if active is not None:
        df = df.withColumn("rfm_recency_days", ((t - F.col("__last_active")) / F.lit(_DAY_US)).cast("double"))
        df = df.drop("__last_active")
    if rfm.signup_column:
        signup = epoch_us(df, names[rfm.signup_column], "features.rfm.signup_column", cfg.input.path)
        df = df.withColumn("rfm_tenure_days", ((t - signup) / F.lit(_DAY_US)).cast("double"))
    else:
        df = _first_seen(df, source, [e], "__first")
        tenure = F.when(F.col(e).isNotNull(), (t - F.col("__first")) / F.lit(_DAY_US))
        df = df.withColumn("rfm_tenure_days", tenure.cast("double")).drop("__first")
    if len(wins) >= 2:
        (short, s_secs), (long_, l_secs) = min(wins, key=lambda x: x[1]), max(wins, key=lambda x: x[1])
        f_s, f_l = F.col(f"rfm_frequency_{short}"), F.col(f"rfm_frequency_{long_}")
        older = (f_l - f_s) / F.lit(float(l_secs - s_secs))
        trend = F.when(older > 0, (f_s / F.lit(float(s_secs))) / older)
        df = df.withColumn(f"rfm_trend_{short}_{long_}", trend.cast("double"))
    return df
