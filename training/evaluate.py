"""``downpour evaluate``: score val/test with the exported model in Spark, metrics, baseline, report, gate.

Steps (each logged with its duration):

1. score the val and test shards with the SavedModel's ``serve_features`` signature (``mapInPandas``,
   bounded Arrow batches) and write ``<output>/evaluation/scores/{val,test}`` (row_id, label, score):
   one pass over the shards, and analysts get the per-row scores (ids are hashed when PII);
2. metrics of each split in one Spark aggregation (``training.metrics``);
3. a Spark ML logistic-regression baseline on the same features (numerics + one-hot categoricals),
   fitted on (a bounded sample of) train;
4. metrics into ``model/model_card.json``; ``report/report.html`` with its plots; ``report/metrics.json``;
5. with ``gate``: the champion of the registry is scored on the *same* test split, and the new model is
   promoted unless it is worse on ``evaluation.gate.metric`` by more than the tolerance
   (``GateRefused``, exit code 4, otherwise).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour import storage
from downpour.artifact import FEATURES_SIGNATURE as FEATURE_SIGNATURE
from downpour.artifact import ModelArtifact
from downpour.config import Config
from downpour.errors import DataContractError
from downpour.layout import REPORT_HTML, RunLayout
from downpour.logs import LOG, timed
from downpour.pipelines.serving import arrow_batch_rows, score_dataframe
from downpour.spark import persist_compressed, persist_level
from downpour.training import registry as reg_mod
from downpour.training.baselines import baseline_scores, fit_baseline, fit_gbt_baseline
from downpour.training.comparison import champion_comparison, compare_with_baseline, metric_args, rebuilt_splits
from downpour.training.decision import Curve, Decision, decide
from downpour.training.input import PreparedData, open_prepared
from downpour.training.metrics import evaluate_scores_by, scalar_metrics
from downpour.training.report import write_report

SPLITS = ("val", "test")


# ---- scoring the shards --------------------------------------------------------------------------------

def _split_frame(spark: SparkSession, prepared: PreparedData, split: str) -> DataFrame | None:
    info = prepared.split(split)
    if info.rows == 0:
        LOG.warning("evaluate: the %s split is empty; no %s metrics", split, split)
        return None
    return spark.read.parquet(info.url)


def _with_split(frames: dict[str, DataFrame]) -> DataFrame:
    """The splits as one DataFrame with a ``split`` column: one scoring job, one metrics pass."""
    parts = [df.withColumn("split", F.lit(name)) for name, df in frames.items()]
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out


# ---- files ---------------------------------------------------------------------------------------------

def _write_report_to(url: str, **kwargs: Any) -> str:
    """Render locally, then publish (in place when the output is local, else upload and swap)."""
    if storage.is_local(url):
        return str(write_report(storage.local_path(url), **kwargs))
    tmp = tempfile.mkdtemp(prefix="downpour-report-")
    try:
        write_report(tmp, **kwargs)
        staging = storage.staging_dir(url)
        storage.upload_dir(tmp, staging)
        storage.publish_dir(staging, url, "report")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return storage.join(url, REPORT_HTML)


def _local_model_copy(model_root: str) -> tuple[str, str | None]:
    """(local directory of the model, temp dir to remove) for copying it into the registry."""
    if storage.is_local(model_root):
        return storage.local_path(model_root), None
    tmp = tempfile.mkdtemp(prefix="downpour-model-")
    return storage.download_dir(model_root, tmp), tmp


# ---- the decision threshold -------------------------------------------------------------------------

def _decision(spark: SparkSession, cfg: Config, prepared: PreparedData, scores: DataFrame,
              splits: set[str]) -> tuple[Decision, Curve]:
    """The threshold chosen on val and its operating point on test; a per-row missed cost is read from
    the rebuilt raw rows (by ``row_id``), the only extra pass it costs."""
    d = cfg.evaluation.decision
    if "val" not in splits:
        raise DataContractError(f"{prepared.url}: the val split is empty; evaluation.decision chooses its "
                                "threshold on val")
    if d.missed_cost_column:
        split_df = rebuilt_splits(spark, cfg, prepared)
        cost = split_df.select("split", "row_id",
                               F.col(cfg.names[d.missed_cost_column]).cast("double").alias("missed_cost"))
        scores = scores.join(cost, ["split", "row_id"], "left")
    test = scores.where(F.col("split") == "test") if "test" in splits else None
    return decide(scores.where(F.col("split") == "val"), test, d)


# ---- the stage -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Subject:
    """What is evaluated: the run's layout, its published data version and the model trained on it
    (its card is updated in place and written once, at the end)."""

    layout: RunLayout
    prepared: PreparedData
    model: ModelArtifact
    card: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.card["model_version"])


@dataclass(frozen=True)
class _Scores:
    """The val/test shards, their per-row scores (written to ``url``) and the metrics of each split."""

    frames: dict[str, DataFrame]
    both: DataFrame  # the splits as one frame with a ``split`` column
    url: str
    metrics: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class _Baselines:
    """Metrics per split of the LR and GBT baselines (None when turned off)."""

    lr: dict[str, dict[str, Any]] | None
    gbt: dict[str, dict[str, Any]] | None


@dataclass(frozen=True)
class _Gate:
    """The quality gate's decision and what it compared."""

    decision: reg_mod.GateDecision
    registry: reg_mod.Registry
    champion_metrics: dict[str, Any] | None
    compared_on: str

    def info(self) -> dict[str, Any]:
        return {**reg_mod.jsonable(asdict(self.decision)), "compared_on": self.compared_on,
                "registry": str(self.registry.root)}


@dataclass(frozen=True)
class _Figures:
    """The scalar metrics of the model and the baselines, and the model against each baseline."""

    model: dict[str, dict[str, Any]]
    baseline: dict[str, dict[str, Any]] | None
    versus: dict[str, Any] | None
    gbt: dict[str, dict[str, Any]] | None
    versus_gbt: dict[str, Any] | None


def _subject(cfg: Config) -> _Subject:
    """The model and the data it was trained on; refused (exit 3) when the published data is another
    version than the model's, since its metrics would describe other rows."""
    layout = RunLayout(cfg.output.path)
    prepared = open_prepared(layout.root)
    model = ModelArtifact.at(layout.model)
    card = model.card()
    version = str(card["model_version"])
    if card.get("data_version") and str(card["data_version"]) != prepared.data_version:
        raise DataContractError(
            f"{model.card_url}: model {version} was trained on data_version "
            f"{card['data_version']}, but {prepared.url} holds {prepared.data_version}; "
            "run `downpour train` again (or prepare the data it was trained on)")
    return _Subject(layout=layout, prepared=prepared, model=model, card=card)


def _score(spark: SparkSession, cfg: Config, subject: _Subject) -> _Scores:
    """One scoring pass over val and test (written for analysts), then one metrics pass per split."""
    ev = cfg.evaluation
    frames = {s: df for s in SPLITS if (df := _split_frame(spark, subject.prepared, s)) is not None}
    if not frames:
        raise DataContractError(f"{subject.prepared.url}: both the val and the test split are empty; "
                                "nothing to evaluate")
    both = _with_split(frames)
    url = subject.layout.evaluation_scores
    with arrow_batch_rows(spark, ev.score_batch_rows), timed(f"evaluate: scoring {sorted(frames)}"):
        scored = score_dataframe(both, subject.model.saved_model, FEATURE_SIGNATURE,
                                 keep=["split", "row_id", "label"], batch_rows=ev.score_batch_rows)
        scored.write.mode("overwrite").partitionBy("split").parquet(url)
    metrics = evaluate_scores_by(spark.read.parquet(url), "split", **metric_args(cfg), what="model")
    return _Scores(frames=frames, both=both, url=url, metrics=metrics)


def _score_reference(spark: SparkSession, subject: _Subject, scores: _Scores) -> None:
    """The score's drift reference, from val (scoring compares each batch's scores with it)."""
    if subject.card.get("drift_reference") is None or "val" not in scores.metrics:
        return
    from downpour.features.drift import numeric_reference

    with timed("evaluate: score drift reference on val"):
        val_scores = spark.read.parquet(scores.url).where(F.col("split") == "val")
        subject.card["drift_reference"]["score"] = numeric_reference(val_scores, {"score": F.col("score")})["score"]


def _threshold(spark: SparkSession, cfg: Config, subject: _Subject,
               scores: _Scores) -> tuple[Decision | None, Curve | None]:
    """The decision threshold under cost, chosen on val (``evaluation.decision``), and its curve."""
    if not cfg.evaluation.decision.enabled:
        return None, None
    with timed("evaluate: decision threshold, chosen on val"):
        chosen, curve = _decision(spark, cfg, subject.prepared, spark.read.parquet(scores.url), set(scores.metrics))
    LOG.info("evaluate: act when score >= %s: val cost %.2f (%.2f with no action), test cost %s, "
             "%s of test rows acted on", chosen.threshold, chosen.val["cost"], chosen.val["cost_if_no_action"],
             f"{chosen.test['cost']:.2f}" if chosen.test else "-",
             f"{chosen.test['action_rate']:.4%}" if chosen.test else "-")
    return chosen, curve


def _baselines(spark: SparkSession, cfg: Config, prepared: PreparedData, both: DataFrame) -> _Baselines:
    """The LR and GBT baselines, fitted on (a bounded sample of) train, scored on the same val/test rows."""
    ev = cfg.evaluation
    if not ev.baseline:
        return _Baselines(lr=None, gbt=None)
    train_info = prepared.split("train")
    train = spark.read.parquet(train_info.url)
    with timed("evaluate: logistic-regression baseline"):
        lr = fit_baseline(train, prepared.feature_state, ev.baseline_max_train_rows, train_info.rows,
                          seed=cfg.training.seed, max_iter=ev.baseline_max_iter)
        lr_metrics = evaluate_scores_by(baseline_scores(lr, both, prepared.feature_state), "split",
                                        **metric_args(cfg), what="baseline")
    if not ev.gbt_baseline:
        return _Baselines(lr=lr_metrics, gbt=None)
    with timed(f"evaluate: gradient-boosted trees baseline ({ev.gbt_max_iter} trees)"):
        trees = fit_gbt_baseline(train, prepared.feature_state, ev.gbt_max_train_rows, train_info.rows,
                                 seed=cfg.training.seed, max_iter=ev.gbt_max_iter, max_depth=ev.gbt_max_depth)
        gbt_metrics = evaluate_scores_by(baseline_scores(trees, both, prepared.feature_state, nominal=False),
                                         "split", **metric_args(cfg), what="GBT baseline")
    return _Baselines(lr=lr_metrics, gbt=gbt_metrics)


def _gate(spark: SparkSession, cfg: Config, subject: _Subject, scores: _Scores,
          baselines: _Baselines) -> _Gate:
    """The champion scored on the same test rows, and the decision (and the baseline check, if set)."""
    ev = cfg.evaluation
    metric, metrics = ev.gate.metric, scores.metrics
    if "test" not in metrics:
        raise DataContractError(f"{subject.prepared.url}: the test split is empty; the quality gate needs it")
    registry = reg_mod.Registry(reg_mod.registry_root(cfg))
    champ = registry.champion()
    new_value = metrics["test"][metric]
    compared_on = "test shards"
    champion_metrics: dict[str, Any] | None = None
    if champ is not None and champ["model_version"] != subject.version:
        champion_metrics, rescored, compared_on = champion_comparison(
            spark, cfg, registry, champ, subject.prepared, scores.frames["test"], subject.model.saved_model)
        if rescored is not None:
            new_value = rescored[metric]
    decision = reg_mod.decide(
        metric, ev.gate.tolerance, subject.version, new_value,
        champ["model_version"] if champ else None,
        (champion_metrics or {}).get(metric, metrics["test"][metric]) if champ else None,
    )
    if ev.gate.vs_baseline is not None:
        decision = reg_mod.against_baseline(decision, metrics["test"][metric],
                                            (baselines.lr or {}).get("test", {}).get(metric), ev.gate.vs_baseline)
    return _Gate(decision=decision, registry=registry, champion_metrics=champion_metrics, compared_on=compared_on)


def _figures(cfg: Config, version: str, metrics: dict[str, dict[str, Any]], baselines: _Baselines) -> _Figures:
    """Scalars of the model and the baselines, the model against each, and a warning where it trails."""
    ev = cfg.evaluation
    scalars = {s: scalar_metrics(m) for s, m in metrics.items()}
    base = {s: scalar_metrics(m) for s, m in baselines.lr.items()} if baselines.lr else None
    # the gate's own tolerance when it compares with the baseline, so the report never contradicts it
    versus = compare_with_baseline(scalars, base, ev.gate.tolerance if ev.gate.vs_baseline is None
                                   else ev.gate.vs_baseline)
    for item in (versus or {}).get("worse", []):
        LOG.warning("evaluate: model %s is worse than the LR baseline: %s", version, item)
    gbt = {s: scalar_metrics(m) for s, m in baselines.gbt.items()} if baselines.gbt else None
    versus_gbt = compare_with_baseline(scalars, gbt, ev.gate.tolerance)
    for item in (versus_gbt or {}).get("worse", []):
        LOG.warning("evaluate: model %s is worse than the GBT baseline: %s", version, item)
    return _Figures(model=scalars, baseline=base, versus=versus, gbt=gbt, versus_gbt=versus_gbt)


def _write_card(cfg: Config, subject: _Subject, scores: _Scores, figures: _Figures, chosen: Decision | None,
                gate_info: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation's part of the model card (metrics, baselines, decision rule, gate), written once."""
    ev, card = cfg.evaluation, subject.card
    card["metrics"] = figures.model
    card["baseline"] = figures.baseline
    card["vs_baseline"] = figures.versus
    card["baseline_gbt"] = figures.gbt
    card["vs_baseline_gbt"] = figures.versus_gbt
    card["decision"] = chosen.to_card() if chosen else None  # None: score writes no decision column
    card["evaluation"] = {
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_version": subject.prepared.data_version, "scores": scores.url,
        "report": subject.layout.report_html,
        "baseline_model": "spark.ml LogisticRegression (L2 1e-4, numerics + one-hot)" if figures.baseline else None,
        "gbt_baseline_model": (f"spark.ml GBTClassifier ({ev.gbt_max_iter} trees, depth {ev.gbt_max_depth}, "
                               f"<= {ev.gbt_max_train_rows} train rows)") if figures.gbt else None,
        "gate": gate_info,
    }
    subject.model.write_card(reg_mod.jsonable(card))
    return card


def _enforce(cfg: Config, subject: _Subject, gate: _Gate, figures: _Figures) -> dict[str, Any]:
    """Register and promote the model, or log the refusal and raise GateRefused (exit 4)."""
    prepared = subject.prepared
    local_model, tmp = _local_model_copy(subject.model.root)
    try:
        return reg_mod.enforce(
            gate.registry, gate.decision, local_model,
            {"val": figures.model.get("val"), "test": figures.model.get("test"), "baseline": figures.baseline,
             "data_version": prepared.data_version},
            reg_mod.TrainedOn(feature_state=prepared.feature_state, manifest=prepared.manifest),
            data_version=prepared.data_version, name=cfg.name,
        )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run_evaluation(spark: SparkSession, cfg: Config, gate: bool = False) -> dict[str, Any]:
    """Score val/test, compute metrics and the baselines, choose the decision threshold, write the card
    and the report; gate if asked. Steps: ``_subject``, ``_score``, ``_score_reference``, ``_threshold``,
    ``_baselines``, ``_gate``, ``_figures``, ``_write_card``, the report, ``_enforce``."""
    if gate:  # the gate may persist raw test rows: a ConfigError naming a persistence key, before any work
        persist_level(spark)
        persist_compressed(spark)
    subject = _subject(cfg)
    LOG.info("evaluate: model %s on data %s", subject.version, subject.prepared.data_version)
    t0 = time.perf_counter()
    scores = _score(spark, cfg, subject)
    _score_reference(spark, subject, scores)
    chosen, curve = _threshold(spark, cfg, subject, scores)
    baselines = _baselines(spark, cfg, subject.prepared, scores.both)
    gated = _gate(spark, cfg, subject, scores, baselines) if gate else None
    figures = _figures(cfg, subject.version, scores.metrics, baselines)
    gate_info = gated.info() if gated else None
    card = _write_card(cfg, subject, scores, figures, chosen, gate_info)
    champion_metrics = gated.champion_metrics if gated else None
    full = {"model": scores.metrics, "baseline": baselines.lr, "baseline_gbt": baselines.gbt,
            "champion_test": champion_metrics}
    with timed("evaluate: report"):
        report = _write_report_to(
            subject.layout.report, metrics=scores.metrics, baseline=baselines.lr, gbt=baselines.gbt,
            model_card=card, manifest=subject.prepared.manifest, history=subject.model.history(), gate=gate_info,
            champion=champion_metrics, decision=card["decision"], decision_curve=curve,
        )
        storage.write_json_atomic(subject.layout.report_metrics, reg_mod.jsonable(full))
    result: dict[str, Any] = {
        "model_version": subject.version, "data_version": subject.prepared.data_version, "metrics": figures.model,
        "baseline": figures.baseline, "vs_baseline": figures.versus, "baseline_gbt": figures.gbt,
        "vs_baseline_gbt": figures.versus_gbt, "report": report, "scores": scores.url, "gate": gate_info,
        "decision": card["decision"], "seconds": round(time.perf_counter() - t0, 1),
    }
    if gated is not None:
        result["champion"] = _enforce(cfg, subject, gated, figures)
    metric = cfg.evaluation.gate.metric
    LOG.info("evaluate: model %s test %s=%s (%.1fs)", subject.version, metric,
             figures.model.get("test", {}).get(metric), result["seconds"])
    return result
