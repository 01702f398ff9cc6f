"""Clean by policy: null handling, range and domain rules, required columns, de-duplication.

Input is the frame from ``ingest.parse_columns``. ``tag_rows`` returns every input row exactly once
with ``_dp_status`` in {``clean``, ``quarantined``, ``duplicate``} and, for quarantined rows, the
first ``reason`` that applied (``malformed``, ``cast_failed:<col>``, ``null:<col>``,
``out_of_range:<col>``, ``not_in_domain:<col>``) and its ``stage``. Tagging instead of filtering is
what makes ``input == clean + quarantined + duplicates`` checkable with a single aggregation
(``outcome_counts``), and what lets the clean rows and the quarantine be written from one cached frame.

Duplicates (same id, or the same raw row when there is no id column) keep the latest row by event
time, ties broken by the parsed values and their imputation and blank markers, so the survivor is the
same on every run and in every input order; they are counted, not quarantined. Rows whose label, id,
event time (time split, window features) or weight is null after the null policy are quarantined as
``null:<col>``: no stage downstream could use them.

Long: the cleaning policies, row tagging, accounting and the quarantine's shape are one contract.
"""

from __future__ import annotations

import math
import os
from decimal import Decimal
from typing import Any

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from downpour.config import Config
from downpour.errors import ConfigError, DataContractError
from downpour.features import exact
from downpour.pipelines.ingest import (
    BLANK_PREFIX,
    CORRUPT,
    LINE,
    LINE_NUMBER,
    RAW,
    REASON,
    ROW_HASH,
    SOURCE,
    STAGE,
    lowercase_columns,
)
from downpour.spark import aggregate_row

STATUS = "_dp_status"
DUP = "_dp_dup"
IMPUTED_PREFIX = "_dp_imputed__"
_NEW_REASON = "_dp_policy_reason"  # apply_policies: the first rule a row breaks, before the ingest reason
FLAG_SUFFIX = "__missing"
NUMERIC = {"int", "integer", "long", "bigint", "double", "float"}
QUARANTINE_META = ("raw_record", "reason", "stage", "source_file", "line_number", "data_version", "model_version")


# ---- configuration checks (before any Spark work) ----------------------------------------------------
def resolve_salt(cfg: Config) -> str | None:
    """The PII salt from ``$<pii.salt_env>``; a ConfigError naming the variable if hashing needs it."""
    if not cfg.pii.hash:
        return os.environ.get(cfg.pii.salt_env) or None
    salt = os.environ.get(cfg.pii.salt_env)
    if not salt:
        raise ConfigError(
            f"pii.salt_env: environment variable {cfg.pii.salt_env} is not set (or empty); it holds the "
            f"salt for hashing the PII columns {cfg.pii.hash}"
        )
    return salt


def check_policies(cfg: Config) -> None:
    """Cross-checks the config model cannot do alone: values castable to column types, PII roles."""
    roles = {
        "id_column": cfg.id_column, "split.key": cfg.split_key, "label.column": cfg.label.column,
        "timestamp_column": cfg.timestamp_column, "split.column": cfg.split.column,
        "features.weight_column": cfg.features.weight_column, "features.rfm.entity": cfg.features.rfm.entity,
    }
    roles.update({f"features.velocity.entities[{i}]": c for i, c in enumerate(cfg.features.velocity.entities)})
    for path, col in roles.items():
        if col is None:
            continue
        if col in cfg.pii.drop:
            raise ConfigError(f"pii.drop: column {col!r} is needed as {path}; hash it (pii.hash) instead")
        typed_role = path in ("label.column", "timestamp_column", "split.column", "features.weight_column")
        if col in cfg.pii.hash and typed_role:
            raise ConfigError(f"pii.hash: column {col!r} is needed as {path} and cannot be hashed")
    schema = cfg.schema_
    _python_value(cfg.label.positive, schema[cfg.label.column], "label.positive")
    pii = set(cfg.pii.hash) | set(cfg.pii.drop)
    for col, pol in cfg.cleaning.nulls.items():
        path = f"cleaning.nulls.{col}"
        if col in pii and pol.action == "impute":
            raise ConfigError(f"{path}: {col!r} is a PII column; it can be rejected or kept, not imputed")
        if pol.action == "impute" and pol.statistic is None:
            _python_value(pol.value, schema[col], f"{path}.value")
        decides = {"label.column": cfg.label.column, "id_column": cfg.id_column, "split.key": cfg.split_key,
                   "split time column": cfg.split_time_column, "timestamp_column": cfg.timestamp_column}
        role = next((r for r, c in decides.items() if c == col), None)
        if pol.statistic and role:
            # fitted on the train split, which this column helps decide (or de-duplicates): circular
            raise ConfigError(f"{path}.statistic: {col!r} is the {role}; impute it with a fixed value "
                              "or reject the row")
        if pol.statistic == "mean" and col in cfg.cleaning.domains:
            raise ConfigError(f"{path}.statistic: a mean need not be one of cleaning.domains.{col}; "
                              "impute the median or the mode (always observed values), or a fixed value")
        if pol.statistic in ("mean", "median") and schema[col] not in NUMERIC:
            raise ConfigError(f"{path}.statistic: {pol.statistic} needs a numeric column, {col!r} is {schema[col]}")
    for col, rule in cfg.cleaning.ranges.items():
        if col in pii:
            raise ConfigError(f"cleaning.ranges.{col}: {col!r} is a PII column (hashed or dropped)")
        if schema[col] == "boolean":
            raise ConfigError(f"cleaning.ranges.{col}: ranges do not apply to boolean columns")
        for bound in ("min", "max"):
            v = getattr(rule, bound)
            if v is not None:
                _python_value(v, schema[col], f"cleaning.ranges.{col}.{bound}")
    for col, values in cfg.cleaning.domains.items():
        if col in pii:
            raise ConfigError(f"cleaning.domains.{col}: {col!r} is a PII column (hashed or dropped)")
        if not values:
            raise ConfigError(f"cleaning.domains.{col}: the list of allowed values is empty")
        for i, v in enumerate(values):
            _python_value(v, schema[col], f"cleaning.domains.{col}[{i}]")
    if cfg.split.method == "time" and cfg.split.boundaries:
        col = cfg.split_time_column
        assert col is not None  # the config model guarantees it for time splits
        b = {k: _python_value(v, schema[col], f"split.boundaries.{k}") for k, v in cfg.split.boundaries.items()}
        if set(b) != {"val", "test"}:
            raise ConfigError("split.boundaries: needs both val and test")
        if b["val"] > b["test"]:
            raise ConfigError("split.boundaries: val must not be later than test")


def _python_value(value: Any, typ: str, path: str) -> Any:
    """``value`` as the Python value of Spark type ``typ``; ConfigError naming ``path`` if impossible."""
    try:
        if value is None:
            raise ValueError("no value")
        if typ in ("int", "integer", "long", "bigint"):
            f = float(value)
            if not f.is_integer():
                raise ValueError("not an integer")
            return int(f)
        if typ in ("double", "float") or typ.startswith("decimal"):
            f = float(value)
            if math.isnan(f):
                raise ValueError("NaN")
            return f
        if typ == "boolean":
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("not a boolean")
            return text in ("true", "1", "yes")
        if typ in ("timestamp", "date"):
            ts = pd.Timestamp(str(value))
            if ts is pd.NaT:
                raise ValueError("not a timestamp")
            return ts
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {value!r} is not a valid {typ} ({exc})") from None


def literal(value: Any, typ: str) -> Column:
    """A Spark literal of type ``typ`` (timestamps as text, parsed in the session time zone)."""
    v = _python_value(value, typ, "value")
    if typ in ("timestamp", "date"):
        return F.lit(str(value)).cast(typ)
    if typ.startswith("decimal"):
        return F.lit(str(value)).cast(typ)
    return F.lit(v).cast(typ)


def required_columns(cfg: Config) -> list[str]:
    """Columns a usable row must have: label, id, event time (when used), weight."""
    out = [cfg.label.column, cfg.id_column, cfg.features.weight_column]
    if cfg.split.method == "time":
        out.append(cfg.split_time_column)
    if cfg.features.velocity.enabled or cfg.features.rfm.enabled:
        out.append(cfg.timestamp_column)
    return list(dict.fromkeys(c for c in out if c))


def flag_columns(cfg: Config) -> dict[str, str]:
    """Raw column -> its missing-flag column (``<safe>__missing``, int 0/1) where ``flag: true``."""
    names = cfg.names
    return {c: f"{names[c]}{FLAG_SUFFIX}" for c, p in cfg.cleaning.nulls.items()
            if p.flag and p.action != "reject" and c not in cfg.pii.drop}


# ---- statistics for imputation (fitted on train, one pass) -------------------------------------------
def statistic_columns(cfg: Config) -> dict[str, str]:
    """Raw column -> statistic (mean / median / mode) for every null policy that imputes a statistic."""
    return {c: p.statistic for c, p in cfg.cleaning.nulls.items() if p.action == "impute" and p.statistic}


def null_statistics(train: DataFrame, cfg: Config) -> dict[str, Any]:
    """Mean / median / mode of every column whose null policy imputes a statistic, over the *train*
    split's clean rows (the caller passes them: a statistic seen on val or test would leak them).

    The statistic columns are still null where they will be imputed (``apply_policies`` defers them),
    so only observed values count. Medians are exact lower medians and means sums of fixed-point
    integers scaled to the largest magnitude (features/exact.py); modes
    come from one grouped count over the stacked columns (ties go to the larger value). None of them
    depends on the row order or the partitioning. Means and double medians are published to 12 significant
    digits; an integer or decimal median is the column's value.
    """
    names = cfg.names
    wanted = statistic_columns(cfg)
    if not wanted:
        return {}
    stats: dict[str, Any] = {}
    numeric = {c: s for c, s in wanted.items() if s in ("mean", "median")}
    if numeric:
        # NaN / +-Infinity parse as doubles but are no statistic (a NaN median cannot be imputed).
        finite = {c: F.when(~F.isnan(names[c]) & (F.abs(names[c]) != F.lit(float("inf"))), F.col(names[c]))
                  for c in numeric}
        medians = [c for c, s in numeric.items() if s == "median"]
        qs = exact.quantiles(train, {c: finite[c] for c in medians}, [0.5]) if medians else {}
        means = [c for c, s in numeric.items() if s == "mean"]
        largest = aggregate_row(train, [F.max(F.abs(finite[c])).alias(names[c]) for c in means]) if means else None
        means = {c: exact.scale_bits(largest[names[c]]) for c in means if largest[names[c]] is not None}
        if means:
            sums = [p for c, bits in means.items() for p in exact.sum_parts(finite[c], bits, names[c])]
            row = aggregate_row(train, [*sums, *[F.count(finite[c]).alias(f"{names[c]}_n") for c in means]])
            for c, bits in means.items():
                stats[c] = float(exact.fixed_sum(row, names[c], bits) / int(row[f"{names[c]}_n"]))
        for c in medians:
            if qs[c]:
                stats[c] = qs[c][0]
    modes = [c for c, s in wanted.items() if s == "mode"]
    if modes:
        stacked = train.select(F.explode(F.array(*[
            F.struct(F.lit(c).alias("k"), F.col(names[c]).cast("string").alias("v")) for c in modes
        ])).alias("kv")).select("kv.k", "kv.v").where(F.col("v").isNotNull())
        counted = stacked.groupBy("k", "v").count()
        best = counted.groupBy("k").agg(F.max_by("v", F.struct("count", "v")).alias("v")).collect()
        stats.update({r["k"]: r["v"] for r in best})
    for c, s in wanted.items():
        v = stats.get(c)
        if v is None:
            raise DataContractError(
                f"column {c!r} in {cfg.input.path}: cannot impute the {s}: the column has no values "
                "in the train split"
            )
        typ = cfg.schema_[c]
        if isinstance(v, float):
            if typ in ("int", "integer", "long", "bigint"):
                # a median is one of the column's values (exact below 2^53); a mean rounds to one
                v = int(v) if s == "median" else int(round(float(f"{v:.12g}")))
            elif typ.startswith("decimal"):
                v = Decimal(repr(v) if s == "median" else f"{v:.12g}")
            else:
                v = float(f"{v:.12g}")
        stats[c] = v
    return stats


def fill_statistics(df: DataFrame, cfg: Config, stats: dict[str, Any]) -> DataFrame:
    """Impute the deferred statistic columns of clean rows with ``stats`` (fitted on train)."""
    names = cfg.names
    out = df
    lowered = lowercase_columns(cfg)
    for col in statistic_columns(cfg):
        value = stats[col]
        if col in lowered and isinstance(value, str):
            value = value.lower()
        out = out.withColumn(names[col], F.coalesce(F.col(names[col]), literal(value, cfg.schema_[col])))
    weight = cfg.features.weight_column
    if weight in statistic_columns(cfg) and "weight" in out.columns:
        out = out.withColumn("weight", F.col(names[weight]).cast("double"))
    return out


# ---- tagging ----------------------------------------------------------------------------------------
def apply_policies(df: DataFrame, cfg: Config,
                   stats: dict[str, Any] | None) -> DataFrame:
    """Null policy (impute / flag / reject), required columns, ranges and domains -> first reason.

    ``stats=None`` (prepare) defers the statistic imputations: the columns stay null, marked as imputed,
    until ``fill_statistics`` fills them with values fitted on the train split, which does not exist
    yet. Scoring passes the statistics of the model's training data.
    """
    names = cfg.names
    deferred = set(statistic_columns(cfg)) if stats is None else set()
    out = df
    reason = F.col(REASON)
    new_reason: Column | None = None

    def add(cond: Column, why: str) -> None:
        nonlocal new_reason
        new_reason = (F.when(cond, F.lit(why)) if new_reason is None else new_reason.when(cond, F.lit(why)))

    flags = flag_columns(cfg)
    for col, pol in cfg.cleaning.nulls.items():
        if col in cfg.pii.drop:
            continue
        s, typ = names[col], cfg.schema_[col]
        if col in flags:
            out = out.withColumn(flags[col], F.col(s).isNull().cast("int"))
        if pol.action == "reject":
            add(F.col(s).isNull(), f"null:{col}")
        elif pol.action == "impute":
            out = out.withColumn(f"{IMPUTED_PREFIX}{s}", F.col(s).isNull())
            if col in deferred:
                continue
            value = stats[col] if pol.statistic and stats is not None else pol.value
            if col in lowercase_columns(cfg) and isinstance(value, str):
                value = value.lower()
            out = out.withColumn(s, F.coalesce(F.col(s), literal(value, typ)))
    for col in required_columns(cfg):
        if col not in deferred:  # a deferred column is null now and filled before anything reads it
            add(F.col(names[col]).isNull(), f"null:{col}")
    for col, rule in cfg.cleaning.ranges.items():
        s, typ = names[col], cfg.schema_[col]
        if rule.min is not None:
            add(F.col(s) < literal(rule.min, typ), f"out_of_range:{col}")
        if rule.max is not None:
            add(F.col(s) > literal(rule.max, typ), f"out_of_range:{col}")
    lowered = lowercase_columns(cfg)
    for col, values in cfg.cleaning.domains.items():
        s, typ = names[col], cfg.schema_[col]
        vals = [v.lower() if col in lowered and isinstance(v, str) else v for v in values]
        add(~F.col(s).isin(*[literal(v, typ) for v in vals]), f"not_in_domain:{col}")
    if new_reason is None:
        return out
    # A null comparison is not a violation (nulls are the null policy's business): coalesce to no reason.
    # The new reason is a column of its own, read twice below: written into both, its chain of rules ran
    # twice per row (ingest.parse_columns says why).
    found = F.col(_NEW_REASON)
    return out.withColumn(_NEW_REASON, new_reason).withColumns({
        STAGE: F.when(reason.isNull() & found.isNotNull(), F.lit("clean")).otherwise(F.col(STAGE)),
        REASON: F.coalesce(reason, found),
    }).drop(_NEW_REASON)


def deduplicate(df: DataFrame, cfg: Config) -> DataFrame:
    """Mark all but the latest row (by event time) per id -- per raw row without an id -- as duplicates.

    Rows of one id at one time are ordered by their parsed values (PII pseudonymised, dropped PII
    excluded), then by their imputation and blank markers (a null imputed to 0.0 and a literal 0.0 keep
    different missing flags): a total order over everything a kept row carries downstream. The
    comparison only runs on such ties, and nothing is hashed for it."""
    names = cfg.names
    if not cfg.cleaning.dedup:
        return df.withColumn(DUP, F.lit(False))
    if cfg.id_column:
        key = F.col(names[cfg.id_column])
        ties = [F.col(names[c]).asc() for c in cfg.schema_ if c not in cfg.pii.drop and c != cfg.id_column]
        ties += [F.col(c).asc() for c in df.columns if c.startswith((IMPUTED_PREFIX, BLANK_PREFIX))]
    else:  # the key is the whole row: nothing to break, but a window function needs an order
        key, ties = F.col(ROW_HASH), [F.col(ROW_HASH).asc()]
    order = ([F.col(names[cfg.timestamp_column]).desc_nulls_last()] if cfg.timestamp_column else []) + ties
    ok = F.col(REASON).isNull()
    w = Window.partitionBy(key, ok).orderBy(*order)
    return df.withColumn(DUP, ok & (F.row_number().over(w) > 1))


def derive_columns(df: DataFrame, cfg: Config) -> DataFrame:
    """``label`` (1.0/0.0), ``row_id``, ``weight`` and ``_dp_status``."""
    names = cfg.names
    lab, typ = cfg.label.column, cfg.schema_[cfg.label.column]
    positive = cfg.label.positive
    if lab in lowercase_columns(cfg) and isinstance(positive, str):
        positive = positive.lower()
    out = df.withColumn("label", F.when(F.col(names[lab]) == literal(positive, typ), 1.0).otherwise(0.0))
    if cfg.id_column:
        row_id = F.col(names[cfg.id_column]).cast("string")
    elif cfg.cleaning.dedup:
        row_id = F.col(ROW_HASH)  # exact duplicates are removed, so the raw-row hash is unique
    else:
        n = F.row_number().over(Window.partitionBy(ROW_HASH).orderBy(ROW_HASH))
        row_id = F.when(n == 1, F.col(ROW_HASH)).otherwise(F.concat_ws("-", F.col(ROW_HASH), n.cast("string")))
    out = out.withColumn("row_id", row_id)
    if cfg.features.weight_column:
        out = out.withColumn("weight", F.col(names[cfg.features.weight_column]).cast("double"))
    status = (F.when(F.col(REASON).isNotNull(), F.lit("quarantined"))
              .when(F.col(DUP), F.lit("duplicate")).otherwise(F.lit("clean")))
    return out.withColumn(STATUS, status)


def serving_nulls(df: DataFrame, cfg: Config) -> DataFrame:
    """Null again the values cleaning imputed *and flagged*, for a ``serving_default`` signature: it
    imputes them itself and sets the ``n__<col>__missing`` flag from the null, as the shards have it.
    Handing it the imputed value instead would score with the flag off (training/serving skew)."""
    names = cfg.names
    for col, flag in flag_columns(cfg).items():  # a kept null is null already: no-op there
        if flag in df.columns:
            df = df.withColumn(names[col], F.when(F.col(flag) == 1, F.lit(None)).otherwise(F.col(names[col])))
    return df


def tag_rows(df: DataFrame, cfg: Config, stats: dict[str, Any] | None) -> DataFrame:
    """Policies -> de-duplication -> derived columns: every input row once, with its status."""
    policed = raw_only_for_quarantine(apply_policies(df, cfg, stats))
    return derive_columns(deduplicate(policed, cfg), cfg).drop(ROW_HASH)


def raw_only_for_quarantine(policed: DataFrame,
                             columns: tuple[str, ...] = (RAW, CORRUPT, SOURCE, LINE)) -> DataFrame:
    """Keep the raw text, malformed line and source file (``columns``) only on rows with a reason (the
    rows that will be quarantined: de-duplication only ever marks rows without one).

    Only the quarantine reads them. Blanked before the de-duplication shuffle, which would otherwise
    carry every row's raw-text struct and path; on every row they also doubled the persisted frame, and
    its in-memory columnar batches of raw-text structs ran a 10M-row ``prepare`` out of a 4 GiB heap.
    """
    rejected = F.col(REASON).isNotNull()
    return policed.withColumns({c: F.when(rejected, F.col(c)) for c in columns})


# ---- counting (one action) --------------------------------------------------------------------------
def outcome_counts(tagged: DataFrame, cfg: Config) -> dict[str, Any]:
    """Counts, quarantine reasons, imputations, blanks and positives from a single aggregation.

    ``counts["tagged"]`` is the number of rows the tagging produced; ``counts["input"]`` is left for
    the caller to fill from an independent count of the input (``ingest.count_input_records``), which
    ``check_invariant`` compares with it.
    """
    names = cfg.names
    imputed = [c for c in tagged.columns if c.startswith(IMPUTED_PREFIX)]
    blanks = [c for c in tagged.columns if c.startswith(BLANK_PREFIX)]
    rows = tagged.groupBy(STATUS, REASON, STAGE).agg(
        F.count(F.lit(1)).alias("_n"), F.sum("label").alias("_pos"),
        *[F.sum(F.col(c).cast("long")).alias(c) for c in imputed + blanks],
    ).collect()
    by_safe = {s: raw for raw, s in names.items()}
    counts = {"tagged": 0, "clean": 0, "quarantined": 0, "duplicates": 0}
    reasons: dict[str, int] = {}
    stages: dict[str, int] = {}
    imputed_n = {by_safe[c[len(IMPUTED_PREFIX):]]: 0 for c in imputed}
    blank_n = {by_safe[c[len(BLANK_PREFIX):]]: 0 for c in blanks}
    positives = 0
    for r in rows:
        n = int(r["_n"])
        counts["tagged"] += n
        status = r[STATUS]
        if status == "clean":
            counts["clean"] += n
            positives += int(r["_pos"] or 0)
            for c in imputed:
                imputed_n[by_safe[c[len(IMPUTED_PREFIX):]]] += int(r[c] or 0)
        elif status == "duplicate":
            counts["duplicates"] += n
        else:
            counts["quarantined"] += n
            reasons[r[REASON]] = reasons.get(r[REASON], 0) + n
            stages[r[STAGE]] = stages.get(r[STAGE], 0) + n
        for c in blanks:
            blank_n[by_safe[c[len(BLANK_PREFIX):]]] += int(r[c] or 0)
    return {
        "counts": counts,
        "quarantine_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "quarantine_stages": stages,
        "imputed": {c: n for c, n in imputed_n.items()},
        "blank_to_null": {c: n for c, n in blank_n.items() if n},
        "positives": positives,
    }


def check_invariant(counts: dict[str, int], input_records: int) -> dict[str, Any]:
    """``input == clean + quarantined + duplicates`` with ``input`` counted from the files themselves
    (``input_records``), not from the tagged groups; the run fails otherwise, naming the gap."""
    total = counts["clean"] + counts["quarantined"] + counts["duplicates"]
    if total != input_records or counts.get("tagged", total) != total:
        raise RuntimeError(f"row accounting broken: the input files hold {input_records} records, the run "
                           f"accounts for {total} (clean {counts['clean']} + quarantined {counts['quarantined']}"
                           f" + duplicates {counts['duplicates']}); {input_records - total:+d} rows unexplained")
    return {"input": input_records, "clean_plus_quarantined_plus_duplicates": total, "holds": True,
            "input_counted_from": "the input files (physical records), independently of the tagging"}


# ---- outputs of the stage ---------------------------------------------------------------------------
def clean_frame(tagged: DataFrame, cfg: Config) -> DataFrame:
    """The clean rows: typed safe-named columns (PII hashed, dropped ones gone), flags, label, row_id,
    weight -- what window features and FeatureState get."""
    names = cfg.names
    kept = [names[c] for c in cfg.schema_ if c not in cfg.pii.drop]
    extra = list(flag_columns(cfg).values()) + ["label", "row_id"]
    if cfg.features.weight_column:
        extra.append("weight")
    return tagged.where(F.col(STATUS) == "clean").select(*kept, *extra)


def quarantine_frame(tagged: DataFrame, cfg: Config, data_version: str,
                     lines: DataFrame | None = None) -> DataFrame:
    """Rejected rows: raw text of every kept column (PII policy applied; none for a malformed line under
    a PII policy, whose fields may hold shifted PII), the malformed line (only without a PII policy),
    ``reason``, ``stage``, ``source_file``, ``line_number`` (malformed lines, from ``lines``:
    ``ingest.malformed_line_numbers``) and ``data_version``."""
    return with_line_numbers(tagged.where(F.col(STATUS) == "quarantined"), lines).select(
        *raw_value_columns(cfg),
        F.col(CORRUPT).alias("raw_record"),
        F.col(REASON).alias("reason"),
        F.col(STAGE).alias("stage"),
        F.col(SOURCE).alias("source_file"),
        F.col(LINE_NUMBER).alias("line_number"),
        F.lit(data_version).alias("data_version"),
    )


def raw_value_columns(cfg: Config, struct: str = RAW,
                      skip: tuple[str, ...] = ()) -> list[Column]:
    """The raw text of every kept column from the ``struct`` column, renamed where it meets a meta name."""
    names = cfg.names
    kept = [names[c] for c in cfg.schema_ if c not in cfg.pii.drop and c not in skip]
    return [F.col(f"{struct}.{s}").alias(f"{s}_value" if s in QUARANTINE_META else s) for s in kept]


def with_line_numbers(rows: DataFrame, lines: DataFrame | None) -> DataFrame:
    """``_dp_line_number`` for the rows whose line hash is in ``lines`` (null elsewhere); ``lines`` has
    one row per key, so no row is multiplied."""
    if lines is None:
        return rows.withColumn(LINE_NUMBER, F.lit(None).cast("long"))
    return rows.join(lines, [SOURCE, LINE], "left")
