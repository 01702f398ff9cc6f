"""``downpour prepare``: ingest -> clean / dedup / PII -> split -> window features -> fit on train ->
transform -> shards -> publish, with ``manifest.json`` written last.

I/O and configuration live here; the stages are DataFrame-in / DataFrame-out functions. The raw input
is read once: the tagged frame (every input row with its status) is persisted and feeds the counts,
the quarantine and the clean branch; the clean rows with window features and split are persisted
and feed the split counts, the feature fit and the one shard write of all splits. Imputation statistics
(``cleaning.nulls.*.statistic``) are fitted on the train split's clean rows, after the split.

Idempotent: ``data_version`` is a hash of the input fingerprint (path, size, mtime of every input
file), ``cfg.fingerprint()``, the PII salt (hashed ids change with it) and the format version; if the
published manifest already has it, the run is a no-op unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour.config import Config
from downpour.errors import DataContractError
from downpour.layout import PreparedLayout
from downpour.logs import LOG, timed
from downpour.pipelines import clean, shards
from downpour.pipelines.ingest import (
    contract_errors,
    count_input_records,
    input_fingerprint,
    list_input_files,
    malformed_line_numbers,
    split_settings,
)
from downpour.pipelines.publish import Publisher, Staging
from downpour.pipelines.rows import split_rows, tagged_rows
from downpour.pipelines.split import SPLITS, split_counts
from downpour.spark import Persisted, persisting, session_conf, sized_partitions
from downpour.storage import FileInfo

if TYPE_CHECKING:
    from downpour.features.state import FeatureState

# 2: PII pseudonyms are HMAC-SHA256; imputation statistics fitted on train; 3: the manifest carries the
# drift reference (a version prepared before it would be a no-op re-run without one); 4: duplicates tied at
# one id and time keep the row with the smallest values, not the smallest row hash; 5: exact quantiles and
# fixed-point moments in the feature state and the drift reference (the same whatever the partitioning)
FORMAT_VERSION = 5
_MAX_LISTED_FILES = 1000


def compute_data_version(files: list[FileInfo], cfg: Config, salt: str | None) -> str:
    """Same input files + same config + same salt -> same data version (and nothing else does)."""
    salt_digest = hashlib.sha256(f"downpour-salt:{salt or ''}".encode()).hexdigest()
    payload = json.dumps({"format": FORMAT_VERSION, "input": input_fingerprint(files),
                          "config": cfg.fingerprint(), "salt": salt_digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_prepare(spark: SparkSession, cfg: Config, force: bool = False) -> dict[str, Any]:
    """Build and publish the prepared data set; returns its manifest (the published one if unchanged)."""
    clean.check_policies(cfg)
    salt = clean.resolve_salt(cfg)  # ConfigError naming the variable, before any Spark work
    # ConfigError naming a persistence key, before any Spark work; the stage's persisted frames are
    # released when it ends, also when it fails
    with persisting(spark) as stage:
        return _prepare(spark, stage, cfg, salt, force)


def _prepare(spark: SparkSession, stage: Persisted, cfg: Config, salt: str | None, force: bool) -> dict[str, Any]:
    timings: dict[str, float] = {}
    publisher = Publisher(spark, cfg.output.path)
    with _step("list input files", timings, "list_inputs"):
        files = list_input_files(spark, cfg.input.path)
    data_version = compute_data_version(files, cfg, salt)
    current = publisher.current_manifest()
    if current and current.get("data_version") == data_version and not force:
        LOG.info("prepare: data version %s is already published at %s; nothing to do (--force rebuilds)",
                 data_version, publisher.prepared)
        return current
    LOG.info("prepare: building data version %s from %d input file(s)", data_version, len(files))
    staging = publisher.stage(data_version)
    try:
        # every scan of the input (the ingest pass, the independent count, the malformed lines' numbers)
        with session_conf(spark, split_settings(spark, cfg, files)):
            manifest = _build(spark, stage, cfg, salt, files, data_version, publisher, staging, timings)
        with _step("publish", timings, "publish"):
            publisher.commit(staging, manifest)
    except BaseException:
        publisher.abort(staging)
        raise
    LOG.info("prepare: %s", json.dumps({"data_version": data_version, **manifest["counts"]}))
    return manifest


@contextmanager
def _step(what: str, timings: dict[str, float], key: str) -> Iterator[None]:
    with timed(f"prepare: {what}") as t:
        yield
    timings[key] = round(t["seconds"], 3)


def account(spark: SparkSession, cfg: Config, files: list[FileInfo],
            tagged: DataFrame) -> tuple[dict[str, Any], dict[str, Any]]:
    """(outcome counts, the invariant): one aggregation over the tagged rows, one independent count of
    the input files' records; raises unless ``input == clean + quarantined + duplicates``."""
    outcome = clean.outcome_counts(tagged, cfg)
    tagged_counts = outcome["counts"]
    if tagged_counts["tagged"] == 0:
        raise DataContractError(f"input {cfg.input.path}: no data rows in {len(files)} file(s)")
    t0 = time.perf_counter()
    records = count_input_records(spark, cfg, files)
    invariant = clean.check_invariant(tagged_counts, records)
    invariant["input_count_seconds"] = round(time.perf_counter() - t0, 3)  # what the independence costs
    outcome["counts"] = {"input": records, **{k: v for k, v in tagged_counts.items() if k != "tagged"}}
    return outcome, invariant


@dataclass(frozen=True)
class _Target:
    """Where this build writes (``staged``) and where its files are read once it is published."""

    staging: Staging
    staged: PreparedLayout
    published: PreparedLayout
    prepared: str  # the published data set's URL (the manifest's ``paths.prepared``)


@dataclass(frozen=True)
class _Ingested:
    """Every input row tagged with its status, persisted (the counts, the quarantine and the clean branch
    all read it), and the accounting of that one read."""

    tagged: DataFrame
    parts: int  # partitions sized to the input: the persisted frames and the shard writes use them
    outcome: dict[str, Any]
    invariant: dict[str, Any]

    @property
    def counts(self) -> dict[str, int]:
        """Rows in the input, clean, quarantined and duplicates (the manifest's ``counts``)."""
        return self.outcome["counts"]


@dataclass(frozen=True)
class _Windowed:
    """The clean rows with their split and window features, persisted (the split counts, the feature fit
    and the shard write read it), and what the split decided."""

    frame: DataFrame
    per_split: dict[str, dict[str, int]]
    split_info: dict[str, Any]
    stats: dict[str, Any]  # the statistic imputations, fitted on train


@dataclass(frozen=True)
class _Fitted:
    """What the train split teaches (and the history scoring needs), all known before any shard is written."""

    entity_history: dict[str, Any] | None
    state: FeatureState
    drift_reference: dict[str, Any]


@dataclass(frozen=True)
class _Shards:
    """The shards as written, per split as the manifest records them, and their model-ready columns."""

    splits: dict[str, dict[str, Any]]
    columns: list[str]


def _build(spark: SparkSession, stage: Persisted, cfg: Config, salt: str | None,
           files: list[FileInfo], data_version: str, publisher: Publisher, staging: Staging,
           timings: dict[str, float]) -> dict[str, Any]:
    """Stage every file of the data version and return its manifest (``run_prepare`` publishes both)."""
    where = _Target(staging, PreparedLayout(staging.url), PreparedLayout(publisher.final_url(staging)),
                    publisher.prepared)
    with contract_errors(cfg):
        ingested = _ingest(spark, stage, cfg, files, salt, timings)
        q_written = _write_quarantine(spark, cfg, files, salt, data_version, ingested, where, timings)
        windowed = _split_and_window(stage, cfg, ingested, timings)
        fitted = _fit(cfg, windowed, where, timings)
        written = _write_split_shards(cfg, windowed, fitted, where, ingested.parts, timings)
        stage.release(windowed.frame)
        fitted.state.save(where.staged.feature_state)
    return _manifest(spark, cfg, files, data_version, where, timings, ingested, q_written, windowed, fitted, written)


def _ingest(spark: SparkSession, stage: Persisted, cfg: Config, files: list[FileInfo], salt: str | None,
            timings: dict[str, float]) -> _Ingested:
    """Read the input once into persisted tagged rows and account for every row; no clean row is an error."""
    with _step("ingest, clean, count", timings, "ingest_clean"):
        parts = sized_partitions(spark, files, cfg.input.format)
        tagged = stage.persist(tagged_rows(spark, cfg, files, salt).coalesce(parts))
        outcome, invariant = account(spark, cfg, files, tagged)
    ingested = _Ingested(tagged, parts, outcome, invariant)
    counts = ingested.counts
    LOG.info("prepare: rows %s; quarantine reasons %s", counts, outcome["quarantine_reasons"])
    if counts["clean"] == 0:
        top = ", ".join(f"{r}: {n}" for r, n in list(outcome["quarantine_reasons"].items())[:3])
        raise DataContractError(f"input {cfg.input.path}: no clean rows; all {counts['input']} rows were "
                                f"rejected or duplicates (top reasons: {top or 'duplicates'})")
    return ingested


def _write_quarantine(spark: SparkSession, cfg: Config, files: list[FileInfo], salt: str | None,
                      data_version: str, ingested: _Ingested, where: _Target, timings: dict[str, float]) -> int:
    """Keep every rejected row, with its reason, where it can be inspected; returns the rows written, which
    must be the rows counted as quarantined."""
    counts = ingested.counts
    with _step("write quarantine", timings, "quarantine"):
        lines = malformed_lines(spark, cfg, files, ingested.tagged, ingested.outcome, salt)
        q = clean.quarantine_frame(ingested.tagged, cfg, data_version, lines)
        q_files = max(1, -(-counts["quarantined"] // 1_000_000))
        q_url = where.staged.quarantine
        # repartition, not coalesce: coalesce(1) would scan the whole tagged frame in one task (the row
        # order of the quarantine is not part of its contract; its rows and reasons are)
        q.repartition(q_files).write.option("compression", shards._CODECS[cfg.shards.compression]) \
            .option("mapreduce.fileoutputcommitter.marksuccessfuljobs", "false").parquet(q_url)
        q_written = sum(f["rows"] for f in shards.inspect_shards(spark, q_url))
    if q_written != counts["quarantined"]:
        raise RuntimeError(f"quarantine: {q_written} rows written, {counts['quarantined']} counted")
    return q_written


def _split_and_window(stage: Persisted, cfg: Config, ingested: _Ingested,
                      timings: dict[str, float]) -> _Windowed:
    """Split the clean rows and add their window features into the persisted frame everything after reads
    (the tagged rows are released then); every clean row must land in a split, and train must not be empty."""
    counts = ingested.counts
    with _step("split", timings, "split"):
        split_df, split_info, stats = split_rows(ingested.tagged, cfg)

    with _step("window features", timings, "window_features"):
        from downpour.features.windows import add_window_features

        frame = stage.persist(add_window_features(split_df, cfg, rows=counts["clean"]).coalesce(ingested.parts))
        per_split = split_counts(frame)
        stage.release(ingested.tagged)
    n_split = sum(s["rows"] for s in per_split.values())
    if n_split != counts["clean"]:
        raise RuntimeError(f"row accounting broken after window features: {n_split} rows in the "
                           f"splits, {counts['clean']} clean rows")
    if per_split["train"]["rows"] == 0:
        raise DataContractError(f"input {cfg.input.path}: the train split is empty "
                                f"({counts['clean']} clean rows, split {split_info})")
    return _Windowed(frame, per_split, split_info, stats)


def _fit(cfg: Config, windowed: _Windowed, where: _Target, timings: dict[str, float]) -> _Fitted:
    """Write the entity history scoring needs, then fit the feature state and the drift reference on the
    train split only, so val and test never inform them."""
    with _step("entity history", timings, "entity_history"):
        entity_history = write_entity_history(windowed.frame, cfg, where.staged.entity_history)

    from downpour.features import drift, exact
    from downpour.features.passes import Passes
    from downpour.features.state import FeatureState

    train = windowed.frame.where(F.col("split") == "train")
    with _step("fit feature state and drift reference on train", timings, "fit_features"):
        # both fits read the same train rows: one computation of the exact quantiles either reads, then
        # one aggregation and one grouped count for both
        known = exact.table(train, FeatureState.quantiles_wanted(train, cfg), drift.quantiles_wanted(cfg))
        passes = Passes()
        state_of = FeatureState.fitting(train, cfg, known, passes)
        reference_of = drift.reference_fitting(train, cfg, known, passes)
        counted = passes.run(train)
        state, drift_reference = state_of(counted), reference_of(counted)
    return _Fitted(entity_history, state, drift_reference)


def _write_split_shards(cfg: Config, windowed: _Windowed, fitted: _Fitted, where: _Target, parts: int,
                        timings: dict[str, float]) -> _Shards:
    """Transform every split with the train-fitted state and write its shards, PII-free, balanced and
    holding exactly the split's rows."""
    with _step("shards", timings, "shards"):
        model_df = fitted.state.transform(windowed.frame, keep=["split"])
        columns = [c for c in model_df.columns if c != "split"]
        _assert_no_pii(model_df.select(*columns), cfg)
        written = shards.write_split_shards(model_df, "split", list(SPLITS), where.staging.url, cfg,
                                            cfg.split.seed, partitions=parts)
    splits = {s: _split_entry(s, plan, described, windowed.per_split[s], where)
              for s, (plan, described) in written.items()}
    return _Shards(splits, columns)


def _split_entry(s: str, plan: shards.ShardPlan, described: list[dict[str, Any]], counted: dict[str, int],
                 where: _Target) -> dict[str, Any]:
    """One split's manifest entry, from its shards' footers: raises unless they are balanced as planned and
    hold the rows the split counted."""
    ratio = shards.check_balance(described, plan, f"{s} ({where.staged.split(s)})")
    summary = shards.summarize(described)
    if summary["shard_rows"] != counted["rows"]:
        raise RuntimeError(f"shards {s}: {summary['shard_rows']} rows written, {counted['rows']} "
                           "in the split")
    entry = {**counted, **summary, "row_group_rows_target": plan.rows_per_group,
             "balance_ratio": round(ratio, 4), "path": where.published.split(s)}
    LOG.info("prepare: %s: %d rows, %d positives, %d files, %d row groups (%d..%d rows each)", s,
             entry["rows"], entry["positives"], entry["files"], entry["row_groups"],
             entry["row_group_rows_min"], entry["row_group_rows_max"])
    return entry


def _manifest(spark: SparkSession, cfg: Config, files: list[FileInfo], data_version: str, where: _Target,
              timings: dict[str, float], ingested: _Ingested, q_written: int, windowed: _Windowed,
              fitted: _Fitted, written: _Shards) -> dict[str, Any]:
    """The data version's record (``manifest.json``, written last): what went in, what came out, and how
    every row is accounted for."""
    counts, outcome = ingested.counts, ingested.outcome
    shard_rows = sum(s["shard_rows"] for s in written.splits.values())
    invariant = {**ingested.invariant, "shard_rows": shard_rows, "quarantine_rows": q_written,
                 "holds": shard_rows == counts["clean"] and q_written == counts["quarantined"]}
    impute_values = {c: p.value for c, p in cfg.cleaning.nulls.items() if p.action == "impute" and not p.statistic}
    published = where.published
    return {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "data_version": data_version,
        "build": where.staging.build,
        "config_hash": cfg.fingerprint(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "spark_version": spark.version,
        "input": {
            "path": cfg.to_public_dict()["input"]["path"], "format": cfg.input.format,
            "fingerprint": input_fingerprint(files), "files": len(files), "bytes": sum(f.size for f in files),
            "paths": [cfg.scrub(f.path) for f in files[:_MAX_LISTED_FILES]],
        },
        "columns": cfg.names,
        "counts": counts,
        "invariant": invariant,
        "quarantine_reasons": outcome["quarantine_reasons"],
        "quarantine": {"path": published.quarantine, "rows": q_written, "stages": outcome["quarantine_stages"]},
        "cleaning": {
            "imputed": outcome["imputed"],
            "impute_values": {**impute_values, **{c: _jsonable(v) for c, v in windowed.stats.items()}},
            "blank_to_null": outcome["blank_to_null"],
            "flags": clean.flag_columns(cfg),
            "pii": {"dropped": list(cfg.pii.drop), "hashed": list(cfg.pii.hash), "salt_env": cfg.pii.salt_env},
        },
        "labels": {"column": cfg.label.column, "positives": outcome["positives"],
                   "positive_rate": round(outcome["positives"] / counts["clean"], 6)},
        "split": windowed.split_info,
        "splits": written.splits,
        "shards": {"compression": cfg.shards.compression, "row_group_rows": cfg.shards.row_group_rows,
                   "min_row_groups": shards.min_row_groups(cfg), "columns": written.columns},
        "feature_state": published.feature_state,
        "entity_history": ({"path": published.entity_history, **fitted.entity_history}
                           if fitted.entity_history else None),
        "drift_reference": fitted.drift_reference,
        "paths": {"prepared": where.prepared, "version": published.root, "manifest": published.manifest},
        "timings": timings,
    }


def write_entity_history(clean: DataFrame, cfg: Config, url: str) -> dict[str, Any] | None:
    """Write the events scoring needs for the window features (features/history.py) into ``url``;
    returns its ``_history.json`` record, or None when the config has no window features."""
    from downpour.features import history

    if not history.needed(cfg):
        return None
    events = history.events(clean, cfg)
    _, end, _ = history.span(events, cfg)
    kept = history.trim(events, cfg, end) if end is not None else events.limit(0)
    meta = history.write(kept, url, cfg, end)
    rows = meta.rows
    LOG.info("prepare: entity history: %d events up to %s (horizon %ds)", rows, meta.end, meta.horizon_seconds)
    return meta.to_dict()


def malformed_lines(spark: SparkSession, cfg: Config, files: list[FileInfo], tagged: DataFrame,
                    outcome: dict[str, Any], salt: str | None) -> DataFrame | None:
    """Line numbers for the malformed rows, or None when there are none (no extra Spark work then)."""
    if not any(r in ("malformed", "json_array") for r in outcome["quarantine_reasons"]):
        return None
    return malformed_line_numbers(spark, cfg, files, tagged, salt)


def _jsonable(v: Any) -> Any:
    """Statistics as JSON values (PII columns cannot be imputed, so none of these is a PII value)."""
    return v if isinstance(v, int | float | str | bool) or v is None else str(v)


def _assert_no_pii(df: DataFrame, cfg: Config) -> None:
    """Shards hold model-ready columns only; a column derived from a PII column must never get there."""
    names = cfg.names
    pii = {names[c] for c in (*cfg.pii.drop, *cfg.pii.hash) if c != cfg.id_column}
    for col in df.columns:
        if col in ("row_id", "label", "weight"):
            continue
        if not col.startswith(("n__", "c__")):
            raise RuntimeError(f"shards: unexpected column {col!r} (only row_id, label, weight, n__*, c__*)")
        base = col[3:].split("__")[0]
        if base in pii or any(part in pii for part in base.split("_x_")):
            raise RuntimeError(f"shards: column {col!r} is derived from a PII column")
