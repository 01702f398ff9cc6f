"""``downpour score``: any raw table -> scores, with prepare's ingest and cleaning rules, window features
over the entity history (``pipelines/score_history.py``) and the model's ``serving_default`` signature,
served by ``pipelines/serving.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour import storage
from downpour.artifact import DECISION_RESOLUTION, EXPLAIN_SIGNATURE, RAW_SIGNATURE, ModelArtifact
from downpour.config import Config
from downpour.errors import DataContractError
from downpour.features import history as H
from downpour.features.drift import batch_drift
from downpour.layout import RegisteredLayout, RunLayout
from downpour.logs import LOG, timed
from downpour.pipelines import clean
from downpour.pipelines import score_history as SH
from downpour.pipelines.ingest import (
    LINE,
    LINE_NUMBER,
    RAW,
    REASON,
    ROW_HASH,
    SOURCE,
    STAGE,
    contract_errors,
    count_input_records,
    list_input_files,
    malformed_line_numbers,
    split_settings,
)
from downpour.pipelines.rows import scoring_rows, without_label
from downpour.pipelines.score_outputs import ScoreOutputs
from downpour.pipelines.serving import (
    ERROR,
    REASON_GAP,
    SCORE,
    Reasons,
    arrow_batch_rows,
    model_fingerprint,
    score_bucket,
    score_dataframe,
    signature_inputs,
)
from downpour.spark import Persisted, persisting, session_conf, sized_partitions
from downpour.storage import FileInfo

# ---- `downpour score`: any raw table -> scores ------------------------------------------------------

_RAW_JSON = "_dp_raw_json"
# rows the model failed on, up to which their ids and errors (<= ~330 bytes each) are broadcast to the join
_BROADCAST_FAILED = 100_000
_RID = "_dp_rid"  # a row's number in the persisted input batch (fixed there; a recomputation may renumber)
_KEY = "_dp_raw_key"  # a hash of a row's raw values (nulls included) and file: how a failed row finds them again
GAP_WARNING = 0.01  # a completeness gap above this (in score units) is logged: more steps would help


class RawInputs:
    """What ``features.state.serving_frame`` needs: the serving dtypes, read from the model's own
    ``serving_default`` signature (the model, not a config, is the truth about what it takes)."""

    def __init__(self, dtypes: dict[str, str]) -> None:
        self.raw_inputs = {k: {"float32": "float64", "double": "float64", "float64": "float64",
                               "int32": "int64", "int64": "int64", "string": "string"}.get(v, v)
                           for k, v in dtypes.items()}


def resolve_model_dir(cfg: Config, model_dir: str | None) -> str:
    """``--model`` (a model directory, or a registry directory: its champion), else ``<output>/model``."""
    if model_dir is None:
        return RunLayout(cfg.output.path).model
    from downpour.champion import CHAMPION, champion_model_url

    champion = storage.join(model_dir, CHAMPION)
    if storage.exists(champion):
        return champion_model_url(model_dir, storage.read_json(champion))
    return model_dir


def _decision(rule: dict[str, Any] | None) -> Any:
    """``decision`` for a model card's rule: act when the score is at least its threshold (None: on no row)."""
    threshold = (rule or {}).get("threshold")
    if threshold is None:
        return F.lit(False)
    # the bucket comparison evaluate costed (training/decision.py), not a float comparison that could
    # disagree with it by one bucket
    return score_bucket(F.col(SCORE)) >= F.lit(round(float(threshold) * DECISION_RESOLUTION))


def _reasons(cfg: Config, card: dict[str, Any]) -> Reasons | None:
    """What ``scoring.reason_codes`` asks of this model; a model exported without an explain signature
    (trained before reason codes) cannot give them, which stops the run before any work."""
    rc = cfg.scoring.reason_codes
    if not rc.enabled:
        return None
    meta = card.get("explain") or {}
    if not meta.get("features") or EXPLAIN_SIGNATURE not in (card.get("signatures") or {}):
        raise DataContractError(f"scoring.reason_codes: model {card.get('model_version')} has no "
                                f"{EXPLAIN_SIGNATURE!r} signature (it was trained before reason codes); "
                                "retrain it or set scoring.reason_codes.enabled: false")
    return Reasons(EXPLAIN_SIGNATURE, tuple(meta["features"]), float(meta["baseline_score"]), rc.top_k, rc.steps)


def _explained(reasons: Reasons | None, groups: list[Any]) -> dict[str, Any] | None:
    """The summary's ``reason_codes``: what was asked, the largest completeness gap of the batch (how far
    a row's attributions are from adding up to score - baseline score; more steps shrink it) and the
    scored rows whose attributions were not finite (no reasons)."""
    if reasons is None:
        return None
    worst = max((r["gap"] for r in groups if r["gap"] is not None), default=None)
    unexplained = sum(int(r["unexplained"]) for r in groups)
    if unexplained:
        LOG.warning("score: %d scored row(s) have no reason codes: their attributions are not finite",
                    unexplained)
    if worst is not None and worst > GAP_WARNING:
        LOG.warning("score: reason-code attributions miss score - baseline score by up to %.3g; raise "
                    "scoring.reason_codes.steps (now %d) for closer attributions", worst, reasons.steps)
    return {"top_k": reasons.top_k, "steps": reasons.steps, "features": len(reasons.features),
            "baseline_score": reasons.baseline_score,
            "max_completeness_gap": None if worst is None else round(float(worst), 6),
            "unexplained_rows": unexplained}


def _impute_statistics(cfg: Config, model_root: str, card: dict[str, Any]) -> dict[str, Any]:
    """The imputation statistics of the model's training data (scoring must never recompute them on the
    rows it scores): from the model card, a manifest beside the model (registry versions), or the
    prepared manifest of the same data version."""
    wanted = {c for c, p in cfg.cleaning.nulls.items() if p.action == "impute" and p.statistic}
    if not wanted:
        return {}
    sources = [card.get("cleaning") or {}]
    # a registry version keeps the data version's manifest beside its model directory
    for url in (ModelArtifact(model_root).manifest_url, RegisteredLayout(storage.join(model_root, "..")).manifest,
                RunLayout(cfg.output.path).prepared.manifest):
        if storage.exists(url):
            man = storage.read_json(url)
            if man.get("data_version") == card.get("data_version"):
                sources.append(man.get("cleaning") or {})
    for src in sources:
        values = src.get("impute_values") or {}
        if wanted <= set(values):
            return {c: values[c] for c in wanted}
    raise DataContractError(
        f"model {model_root}: the imputation statistics of its training data ({sorted(wanted)}) are not "
        f"available (data_version {card.get('data_version')}); score with the model's registry version or "
        "keep its prepared data")


def _scoring_config(cfg: Config, input_url: str, fmt: str | None) -> Config:
    """The config with the scoring input (rows are read without the label: ``rows.without_label``)."""
    inp = cfg.input.model_copy(update={"path": input_url, "format": fmt or cfg.input.format})
    return cfg.model_copy(update={"input": inp})


def _accounted(records: int, clean_n: dict[bool, int], outcome: dict[bool, int]) -> dict[str, int]:
    """The run's counts; raises unless every input record was scored or quarantined."""
    n_ok, n_rejected = clean_n.get(True, 0), clean_n.get(False, 0)
    n_scored, n_failed = int(outcome.get(False, 0)), int(outcome.get(True, 0))
    if n_scored + n_failed != n_ok or records != n_scored + n_rejected + n_failed:
        raise RuntimeError(f"score: row accounting broken: the input files hold {records} records; "
                           f"{n_ok} clean rows ({n_scored} scored, {n_failed} failed in the model), "
                           f"{n_rejected} rejected")
    return {"input": records, "scored": n_scored, "quarantined": n_rejected + n_failed}


@dataclass(frozen=True)
class _Model:
    """The model a scoring run serves, read once: its directory (symlinks resolved), card, decision
    rule, reason codes, imputation statistics and the raw inputs its serving signature takes."""

    artifact: ModelArtifact
    card: dict[str, Any]
    rule: dict[str, Any] | None
    reasons: Reasons | None
    stats: dict[str, Any]
    raw_inputs: dict[str, str]

    @property
    def version(self) -> str:
        return str(self.card["model_version"])


def _open_model(cfg: Config, model_dir: str | None) -> _Model:
    """``--model`` (or the run's model) and everything scoring needs from it, before any Spark work."""
    artifact = ModelArtifact.at(resolve_model_dir(cfg, model_dir))
    card = artifact.card(hint="run `downpour train` or pass --model")
    saved = artifact.saved_model
    return _Model(artifact=artifact, card=card,
                  rule=card.get("decision"),  # evaluate's threshold (training/decision.py); None: no decision
                  reasons=_reasons(cfg, card), stats=_impute_statistics(cfg, artifact.root, card),
                  raw_inputs=signature_inputs(saved, RAW_SIGNATURE, model_fingerprint(saved)))


@dataclass(frozen=True)
class _Batch:
    """The input batch, ingested and cleaned (persisted), and what one pass over it counted."""

    files: list[FileInfo]
    # every input row: ``__id``, ``_RID``, the reason it failed (or null), ``_KEY``, its raw values as JSON
    # and its file where it has a reason (persisted)
    tagged: DataFrame
    wide: DataFrame  # the same rows with every row's raw values and file: the lineage, not persisted
    raw_schema: Any
    clean_n: dict[bool, int]  # clean (True) and rejected (False) rows
    any_malformed: bool
    t_min: Any  # the first and last event time of the clean rows (window features), else None
    t_max: Any

    @property
    def ok(self) -> DataFrame:
        return self.tagged.where(F.col(REASON).isNull())


def content_key(struct: str, schema: Any, *more: str) -> Column:
    """A 64-bit hash of a struct column's values, which of its fields are null, and ``more`` columns.

    Which fields are null is hashed too: a struct's ``xxhash64`` skips null fields, so ("5", null) and
    (null, "5") would share a key."""
    nulls = F.array(*[F.col(struct)[f.name].isNull() for f in schema.fields])
    return F.xxhash64(F.col(struct), nulls, *[F.col(c) for c in more])


def _ingest(spark: SparkSession, stage: Persisted, cfg: Config, full: Config, files: list[FileInfo],
            salt: str | None, stats: dict[str, Any]) -> _Batch:
    """Read, parse and clean the input ``files`` with prepare's rules; one aggregation counts the outcome."""
    names = cfg.names
    tagged = scoring_rows(spark, full, files, salt, stats)
    ident = F.col(names[cfg.id_column]).cast("string") if cfg.id_column else F.col(ROW_HASH)
    raw_schema = tagged.schema[RAW].dataType
    raw_json, key = F.to_json(F.col(RAW)), content_key(RAW, raw_schema, SOURCE)  # one copy of the raw values
    parts = sized_partitions(spark, files, full.input.format)  # the batch alone: coalescing has no shuffle
    wide = tagged.withColumns({"__id": ident, _RAW_JSON: raw_json, _KEY: key}).drop(RAW, ROW_HASH) \
        .coalesce(parts).withColumn(_RID, F.monotonically_increasing_id())
    # The persisted batch keeps the raw values and the file only where the quarantine needs them for sure
    # (the rejected rows), which every pass over the batch would read. A row the model fails on takes them
    # from ``wide`` by content (``_failed_rows``). The JSON stands under the condition: blanked afterwards,
    # in a projection Spark does not inline (it reads the reason twice), it was computed for every row.
    rejected = F.col(REASON).isNotNull()
    tagged = stage.persist(tagged.withColumns({"__id": ident, _RAW_JSON: F.when(rejected, raw_json), _KEY: key,
                                               SOURCE: F.when(rejected, F.col(SOURCE))}).drop(RAW, ROW_HASH)
                           .coalesce(parts).withColumn(_RID, F.monotonically_increasing_id()))
    is_ok = F.col(REASON).isNull()
    with timed("score: ingest and clean"):
        by_outcome = tagged.groupBy(is_ok.alias("ok"), F.col(LINE).isNotNull().alias("malformed")).agg(
            F.count(F.lit(1)).alias("count"), *SH.input_time_columns(full, tagged, is_ok)).collect()
    times = [r for r in by_outcome if r["ok"] and "t_min" in r and r["t_min"] is not None]
    return _Batch(files=files, tagged=tagged, wide=wide, raw_schema=raw_schema,
                  clean_n={ok: sum(int(r["count"]) for r in by_outcome if r["ok"] == ok) for ok in (True, False)},
                  any_malformed=any(r["malformed"] for r in by_outcome),
                  t_min=min((r["t_min"] for r in times), default=None),
                  t_max=max((r["t_max"] for r in times), default=None))


def _serving_rows(full: Config, model: _Model, batch: _Batch, past: Any,
                  input_url: str) -> DataFrame:
    """The clean rows with window features over the history and the batch, as the serving signature
    takes them (raw inputs in serving dtypes)."""
    from downpour.features.state import serving_frame
    from downpour.features.windows import add_window_features

    # the windows' shuffles and the Arrow round trip to the model carry no raw values, file or content key:
    # only the rows the model fails on need them (``_failed_rows``)
    ok = batch.ok.drop(_RAW_JSON, SOURCE, _KEY)
    if H.needed(full):
        # counted already: the clean input rows and the history sources' rows bound the rows per key
        bound = None if past.rows is None else batch.clean_n.get(True, 0) + past.rows
        events = _served_columns(SH.clean_events(ok, full), full, model)
        # the hot keys are counted over the input and the whole history, without the anti-join
        # the identity has done its work once the history rows that are input rows are left out
        ok = H.drop_context(add_window_features(H.with_context(events, past.frame).drop(H.HID), full, rows=bound,
                                                count_over=H.with_every_event(events, past.frame)))
    missing = [c for c in model.raw_inputs if c not in ok.columns]
    if missing:
        raise DataContractError(f"column {missing[0]!r}: the model {model.version} needs it; it is not produced "
                                f"from the input {input_url} by this config")
    return serving_frame(clean.serving_nulls(ok, full), RawInputs(model.raw_inputs),
                         keep=("__id", _RID))


def _served_columns(events: DataFrame, full: Config, model: _Model) -> DataFrame:
    """Only the columns that reach the model or its windows: the ids, the history identity, what the
    windows read, the model's raw inputs and the cleaning flags ``serving_nulls`` reads. Every window
    shuffle and sort carries each column it is handed (a wide table has dozens nobody reads)."""
    from downpour.features.windows import referenced_columns

    names = full.names
    flags = [c for col, flag in clean.flag_columns(full).items() for c in (names[col], flag)]
    ts = [names[full.timestamp_column]] if full.timestamp_column else []
    wanted = {"__id", _RID, H.HID, *ts, *referenced_columns(full), *model.raw_inputs, *flags}
    return events.select(*[c for c in events.columns if c in wanted])


@dataclass(frozen=True)
class _Scored:
    frame: DataFrame  # persisted: ``__id``, ``_RID``, score [, reasons], score_error
    outcome: dict[bool, int]  # rows the model failed on (True) and scored (False)
    acted: int
    explained: dict[str, Any] | None


def _serve(spark: SparkSession, stage: Persisted, cfg: Config, model: _Model, serving: DataFrame) -> _Scored:
    """Score (and explain) every row in ``mapInPandas``; one aggregation counts failures, decisions and
    the largest reason-code completeness gap."""
    batch = cfg.evaluation.score_batch_rows
    reasons = model.reasons
    served = reasons.signature if reasons else RAW_SIGNATURE
    with arrow_batch_rows(spark, batch), timed(f"score: {served} in mapInPandas"):
        scored = stage.persist(score_dataframe(serving, model.artifact.saved_model, RAW_SIGNATURE,
                                               keep=["__id", _RID], batch_rows=batch, isolate_errors=True,
                                               reasons=reasons))
        gap = ([F.max(REASON_GAP).alias("gap"), F.count(F.when(F.col(REASON_GAP).isNull(), 1)).alias("unexplained")]
               if reasons else [])
        by = scored.groupBy(F.col(ERROR).isNotNull().alias("failed"), _decision(model.rule).alias("acted")).agg(
            F.count(F.lit(1)).alias("count"), *gap).collect()
    return _Scored(frame=scored,
                   outcome={f: sum(r["count"] for r in by if r["failed"] == f) for f in {r["failed"] for r in by}},
                   acted=sum(r["count"] for r in by if not r["failed"] and r["acted"]),
                   explained=_explained(reasons, [r for r in by if not r["failed"]] if reasons else []))


def _write(spark: SparkSession, cfg: Config, full: Config, model: _Model, batch: _Batch,
           scored: _Scored, outputs: ScoreOutputs, salt: str | None) -> None:
    """The scores (one row per scored input row) and the quarantine (rejected and failed rows, raw
    values under the PII policy, with the reason and where to find them), into their staging
    directories: ``run_scoring`` publishes them once every row is accounted for."""
    rule, reasons, version = model.rule, model.reasons, model.version
    frame, tagged = scored.frame, batch.tagged
    with timed("score: write scores and quarantine"):
        (frame.where(F.col(ERROR).isNull())
         .select(F.col("__id").alias(cfg.id_column or "row_id"), F.col(SCORE).cast("double").alias(SCORE),
                 *([_decision(rule).alias("decision")] if rule else []), *(reasons.columns() if reasons else []),
                 F.lit(version).alias("model_version"))
         .write.mode("overwrite").parquet(outputs.staged("scores")))
        lines = malformed_line_numbers(spark, full, batch.files, tagged, salt) if batch.any_malformed else None
        rejected = clean.with_line_numbers(tagged.where(F.col(REASON).isNotNull()), lines).select(
            F.from_json(_RAW_JSON, batch.raw_schema).alias("raw"), F.col(REASON).alias("reason"),
            F.col(STAGE).alias("stage"), F.col(SOURCE).alias("source_file"),
            F.col(LINE_NUMBER).alias("line_number"))
        n_failed = scored.outcome.get(True, 0)
        if n_failed:
            rejected = rejected.unionByName(_failed_rows(batch, frame, n_failed))
        # the placeholder label never leaves
        raw_cols = clean.raw_value_columns(full, struct="raw", skip=(cfg.label.column,))
        quarantine = rejected.select(
            *raw_cols, "reason", "stage", "source_file", "line_number", F.lit(version).alias("model_version"))
        q_url = outputs.staged("quarantine")
        quarantine.write.mode("overwrite").parquet(q_url)
        if n_failed:  # their raw values were recomputed from the files: none may have gone missing
            written = spark.read.parquet(q_url).count()  # from the files' footers
            expected = batch.clean_n.get(False, 0) + n_failed
            if written != expected:
                raise RuntimeError(f"score: quarantine: {written} rows written, {expected} counted "
                                   f"({n_failed} failed in the model); did the input change while it was scored?")


def _failed_rows(batch: _Batch, frame: DataFrame, n_failed: int) -> DataFrame:
    """The rows the model failed on, as quarantine rows: raw values and file from the batch's lineage.

    Matched by content (``_KEY``, a hash of the raw values and the file, and the id), not by ``_RID``:
    a recomputation may plan the file splits anew (on a cluster they follow the cores registered at the
    time), which renumbers the rows. Rows with the same key hold the same raw values and file, so any
    match is right; one per failed row is kept."""
    small = n_failed <= _BROADCAST_FAILED
    errors = frame.where(F.col(ERROR).isNotNull()).select(_RID, ERROR)
    keyed = batch.tagged.join(F.broadcast(errors) if small else errors, _RID).select(
        _RID, ERROR, F.col(_KEY).alias("_e_key"), F.col("__id").alias("_e_id"))
    wide = batch.wide.where(F.col(REASON).isNull()).select(_KEY, "__id", _RAW_JSON, SOURCE)
    on = (F.col(_KEY) == F.col("_e_key")) & F.col("__id").eqNullSafe(F.col("_e_id"))
    return wide.join(F.broadcast(keyed) if small else keyed, on).dropDuplicates([_RID]).select(
        F.from_json(_RAW_JSON, batch.raw_schema).alias("raw"), F.col(ERROR).alias("reason"),
        F.lit("score").alias("stage"), F.col(SOURCE).alias("source_file"),
        F.lit(None).cast("long").alias("line_number"))


def run_scoring(spark: SparkSession, cfg: Config, input_url: str, output_url: str,
                model_dir: str | None = None, fmt: str | None = None, history: list[str] | None = None,
                history_out: str | None = None, history_store: str | None = None,
                no_history: bool = False) -> dict[str, Any]:
    """Score a raw table: the prepare stage's ingest and cleaning rules, window features over the entity
    history and the input (pipelines/score_history.py), then the model's ``serving_default`` signature
    (``explain`` with reason codes); Parquet (id, ``score``, [``decision``], [``reason_i``,
    ``reason_i_contribution``], ``model_version``) to ``output_url``, every row that cannot be scored to
    ``<output_url>_quarantine`` with its reason, ``<output_url>_summary.json``; returns the summary.

    Steps: check the flags and open the model (before any Spark work), load the history, ``_ingest``,
    ``_serving_rows``, ``_serve``, ``_write`` (staged), drift, the row accounting, the history roll-forward,
    publishing the scores and the quarantine (pipelines/score_outputs.py), the summary (last)."""
    t0 = time.perf_counter()
    history = list(history or [])
    SH.check_flags(history, history_out, history_store, no_history)
    clean.check_policies(cfg)
    salt = clean.resolve_salt(cfg)
    model = _open_model(cfg, model_dir)
    full = _scoring_config(cfg, input_url, fmt)
    unlabeled = without_label(cfg)
    if unlabeled.names != {k: v for k, v in cfg.names.items() if k in unlabeled.schema_}:
        raise DataContractError(f"column {cfg.label.column!r}: its safe name collides with another column's; "
                                "rename one of them to score without a label")
    outputs = ScoreOutputs(spark, output_url)
    LOG.info("score: %s with model %s -> %s", input_url, model.version, output_url)

    def tag_history(url: str) -> tuple[Config, DataFrame]:  # raw --history rows: the input's own chain
        h_full = _scoring_config(cfg, url, fmt)
        return h_full, scoring_rows(spark, h_full, list_input_files(spark, url), salt, model.stats)

    # the persisted frames of this stage (downpour/spark.py) are released when it ends or fails; the outputs
    # are staged, and published only once every row is accounted for (pipelines/score_outputs.py)
    with outputs.removed_on_failure(), persisting(spark) as stage:
        past = SH.load(spark, stage, full, model_root=model.artifact.root, card=model.card, history=history,
                       store=history_store, no_history=no_history, tag_raw=tag_history)
        files = list_input_files(spark, input_url)  # its every scan (failed rows' values, the count) split alike
        with contract_errors(full), session_conf(spark, split_settings(spark, full, files)):
            batch = _ingest(spark, stage, cfg, full, files, salt, model.stats)
            SH.check_gap(full, past, batch.t_min, input_url)
            scored = _serve(spark, stage, cfg, model, _serving_rows(full, model, batch, past, input_url))
            _write(spark, cfg, full, model, batch, scored, outputs, salt)
            drift = batch_drift(cfg.scoring.drift, model.card, batch.ok, scored.frame.where(F.col(ERROR).isNull()),
                                F.col(SCORE), cfg.names)
            records = count_input_records(spark, full, batch.files)  # independent of the parsing it checks
            counts = _accounted(records, batch.clean_n, scored.outcome)
            out_url = history_out or history_store  # rolled forward only once every row is accounted for
            rolled = (SH.roll_forward(stage, full, past, batch.ok, batch.t_min, batch.t_max, out_url)
                      if out_url and H.needed(full) else None)
            outputs.publish()
    rule = model.rule
    summary = {**counts, "model_version": model.version, "output": cfg.scrub(output_url),
               "quarantine": cfg.scrub(outputs.layout.quarantine),
               "history": {**past.summary(batch.t_min, batch.t_max), "written": rolled} if H.needed(full) else None,
               "decision": {"threshold": rule.get("threshold"), "acted": scored.acted} if rule else None,
               "drift": drift,
               "reason_codes": scored.explained,
               "seconds": round(time.perf_counter() - t0, 3)}
    outputs.write_summary(summary)
    LOG.info("score: %s in %.1fs", json.dumps(counts), time.perf_counter() - t0)
    return {**summary, "output": output_url, "quarantine": outputs.layout.quarantine}
