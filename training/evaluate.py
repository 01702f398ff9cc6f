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

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour import storage
from downpour.artifact import FEATURES_SIGNATURE as FEATURE_SIGNATURE
from downpour.artifact import RAW_SIGNATURE, ModelArtifact
from downpour.config import Config
from downpour.errors import DataContractError
from downpour.features.state import serving_frame
from downpour.layout import REPORT_HTML, RunLayout
from downpour.logs import LOG, timed
from downpour.pipelines.score import RawInputs
from downpour.pipelines.serving import arrow_batch_rows, score_dataframe, signature_inputs
from downpour.spark import persist_level
from downpour.training import registry as reg_mod
from downpour.training.baselines import baseline_scores, fit_baseline, fit_gbt_baseline
from downpour.training.decision import Curve, Decision, decide
from downpour.training.input import PreparedData, open_prepared
from downpour.training.metrics import evaluate_scores, evaluate_scores_by, scalar_metrics
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


def score_split(shards: DataFrame, saved_model: str, batch_rows: int) -> DataFrame:
    """(row_id, label, score) of model-ready shard rows, scored by ``serve_features`` (lazy)."""
    return score_dataframe(shards, saved_model, FEATURE_SIGNATURE, keep=["row_id", "label"],
                           batch_rows=batch_rows)


def _metric_args(cfg: Config) -> dict[str, Any]:
    ev = cfg.evaluation
    return {"fpr_points": ev.fpr_points, "precision_at": ev.precision_at_k, "resolution": ev.metric_resolution}


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


# ---- the gate ------------------------------------------------------------------------------------------

def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def raw_split_rows(spark: SparkSession, cfg: Config, prepared: PreparedData,
                   split: str = "test") -> DataFrame:
    """The raw (typed, cleaned, windowed) rows of one split of the published data, rebuilt with the
    prepare stage's own functions: what a ``serving_default`` signature takes. Refused when the input
    changed since the data was prepared, since the rebuilt split would then be another one.

    The imputation statistics are the published ones (fitted on that version's train split).
    """
    from downpour.features.windows import add_window_features
    from downpour.pipelines import clean
    from downpour.pipelines.ingest import contract_errors

    split_df = _rebuilt_splits(spark, cfg, prepared)
    with contract_errors(cfg):
        rows = add_window_features(split_df, cfg).where(F.col("split") == split)
        rows = clean.serving_nulls(rows, cfg)  # serving_default imputes and flags them itself
    return rows


def _rebuilt_splits(spark: SparkSession, cfg: Config, prepared: PreparedData) -> DataFrame:
    """The clean rows with ``split`` and ``row_id`` of the published data version, rebuilt
    from the input with prepare's own chain and the published imputation statistics (lazy). Refused when
    the input or the config changed since that version was prepared: the rows would be other rows."""
    from downpour.pipelines import clean
    from downpour.pipelines.ingest import contract_errors, list_input_files
    from downpour.pipelines.prepare import compute_data_version
    from downpour.pipelines.rows import split_rows, tagged_rows

    salt = clean.resolve_salt(cfg)
    files = list_input_files(spark, cfg.input.path)
    if compute_data_version(files, cfg, salt) != prepared.data_version:
        raise DataContractError(
            f"input.path {cfg.input.path}: the input or the config changed since data version "
            f"{prepared.data_version} was prepared; run `downpour prepare` again before evaluating")
    with contract_errors(cfg):
        tagged = tagged_rows(spark, cfg, files, salt)
        stats = {c: v for c, v in ((prepared.manifest.get("cleaning") or {}).get("impute_values") or {}).items()
                 if c in clean.statistic_columns(cfg)}
        split_df, _, _ = split_rows(tagged, cfg, stats)
    return split_df


def _decision(spark: SparkSession, cfg: Config, prepared: PreparedData, scores: DataFrame,
              splits: set[str]) -> tuple[Decision, Curve]:
    """The threshold chosen on val and its operating point on test; a per-row missed cost is read from
    the rebuilt raw rows (by ``row_id``), the only extra pass it costs."""
    d = cfg.evaluation.decision
    if "val" not in splits:
        raise DataContractError(f"{prepared.url}: the val split is empty; evaluation.decision chooses its "
                                "threshold on val")
    if d.missed_cost_column:
        split_df = _rebuilt_splits(spark, cfg, prepared)
        cost = split_df.select("split", "row_id",
                               F.col(cfg.names[d.missed_cost_column]).cast("double").alias("missed_cost"))
        scores = scores.join(cost, ["split", "row_id"], "left")
    test = scores.where(F.col("split") == "test") if "test" in splits else None
    return decide(scores.where(F.col("split") == "val"), test, d)


def _raw_scores(df: DataFrame, saved_model: str, batch_rows: int) -> DataFrame:
    inputs = signature_inputs(saved_model, RAW_SIGNATURE)
    serving = serving_frame(df, RawInputs(inputs), keep=("row_id", "label"))
    return score_dataframe(serving, saved_model, RAW_SIGNATURE, keep=["row_id", "label"], batch_rows=batch_rows)


def champion_comparison(spark: SparkSession, cfg: Config, registry: reg_mod.Registry, champ: dict[str, Any],
                        prepared: PreparedData, test: DataFrame, new_saved_model: str
                        ) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(champion test metrics, new-model test metrics when re-scored, how they were compared).

    Both models are scored on the same rows of the current test split. The shards hold columns encoded
    by the *current* feature state, so a champion with an identical feature state is scored on the
    shards (``serve_features``); one fitted on other features (an earlier data version) is scored,
    together with the new model, on the raw test rows through ``serving_default``, which carries each
    model's own preprocessing.
    """
    registered = registry.layout.pointed(champ["path"])
    saved = ModelArtifact(registered.model).saved_model
    champ_state = storage.read_json(registered.feature_state) if storage.exists(registered.feature_state) else None
    ev = cfg.evaluation
    with arrow_batch_rows(spark, ev.score_batch_rows):
        if champ_state is not None and _canonical(champ_state) == _canonical(prepared.feature_state):
            scored = score_split(test, saved, ev.score_batch_rows)
            m = evaluate_scores(scored, **_metric_args(cfg), what=f"champion {champ['model_version']} test")
            return m, None, f"test shards ({FEATURE_SIGNATURE})"
        LOG.info("gate: champion %s has other features than data %s: comparing on raw test rows",
                 champ["model_version"], prepared.data_version)
        with timed("gate: rebuilding the raw test rows"):
            raw = raw_split_rows(spark, cfg, prepared)
            raw = raw.persist(persist_level(spark))
        try:
            both = (_raw_scores(raw, saved, ev.score_batch_rows).withColumn("model", F.lit("champion"))
                    .unionByName(_raw_scores(raw, new_saved_model, ev.score_batch_rows)
                                 .withColumn("model", F.lit("new"))))
            by = evaluate_scores_by(both, "model", **_metric_args(cfg), what="gate (raw test rows)")
        finally:
            raw.unpersist()
        return by["champion"], by["new"], f"raw test rows ({RAW_SIGNATURE})"


# ---- model against baseline ------------------------------------------------------------------------------
COMPARED = ("roc_auc", "pr_auc")


def compare_with_baseline(model: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, Mapping[str, Any]] | None,
                          tolerance: float) -> dict[str, Any] | None:
    """Per split and headline metric: the model's figure, the baseline's and the difference; ``worse``
    lists where the model trails by more than ``tolerance`` (a deep model that loses to the linear one
    beside it should not go unnoticed). None without a baseline."""
    if not baseline:
        return None
    splits: dict[str, dict[str, Any]] = {}
    worse: list[str] = []
    for split, m in model.items():
        b = baseline.get(split)
        if not b:
            continue
        splits[split] = {}
        for k in COMPARED:
            mv, bv = m.get(k), b.get(k)
            defined = isinstance(mv, float | int) and isinstance(bv, float | int) and mv == mv and bv == bv
            delta = float(mv) - float(bv) if defined else None
            splits[split][k] = {"model": mv, "baseline": bv, "delta": delta}
            if delta is not None and delta < -tolerance:
                worse.append(f"{split} {k} {mv:.4f} < baseline {bv:.4f} (by {-delta:.4f}, tolerance {tolerance:g})")
    return {"tolerance": tolerance, "splits": splits, "worse": worse}


# ---- the stage -----------------------------------------------------------------------------------------

def run_evaluation(spark: SparkSession, cfg: Config, gate: bool = False) -> dict[str, Any]:
    """Score val/test, compute metrics and the baseline, write the card and the report; gate if asked."""
    ev = cfg.evaluation
    layout = RunLayout(cfg.output.path)
    prepared = open_prepared(layout.root)
    model = ModelArtifact.at(layout.model)
    saved_model = model.saved_model
    card = model.card()
    version = str(card["model_version"])
    if card.get("data_version") and str(card["data_version"]) != prepared.data_version:
        raise DataContractError(
            f"{model.card_url}: model {version} was trained on data_version "
            f"{card['data_version']}, but {prepared.url} holds {prepared.data_version}; "
            "run `downpour train` again (or prepare the data it was trained on)")
    LOG.info("evaluate: model %s on data %s", version, prepared.data_version)
    t0 = time.perf_counter()

    frames = {s: df for s in SPLITS if (df := _split_frame(spark, prepared, s)) is not None}
    if not frames:
        raise DataContractError(f"{prepared.url}: both the val and the test split are empty; nothing to evaluate")
    both = _with_split(frames)
    scores_url = layout.evaluation_scores
    with arrow_batch_rows(spark, ev.score_batch_rows), timed(f"evaluate: scoring {sorted(frames)}"):
        scored = score_dataframe(both, saved_model, FEATURE_SIGNATURE, keep=["split", "row_id", "label"],
                                 batch_rows=ev.score_batch_rows)
        scored.write.mode("overwrite").partitionBy("split").parquet(scores_url)
    metrics = evaluate_scores_by(spark.read.parquet(scores_url), "split", **_metric_args(cfg), what="model")
    if card.get("drift_reference") is not None and "val" in metrics:
        from downpour.features.drift import numeric_reference

        with timed("evaluate: score drift reference on val"):
            val_scores = spark.read.parquet(scores_url).where(F.col("split") == "val")
            card["drift_reference"]["score"] = numeric_reference(val_scores, {"score": F.col("score")})["score"]
    chosen: Decision | None = None
    curve: Curve | None = None
    if ev.decision.enabled:
        with timed("evaluate: decision threshold, chosen on val"):
            chosen, curve = _decision(spark, cfg, prepared, spark.read.parquet(scores_url), set(metrics))
        LOG.info("evaluate: act when score >= %s: val cost %.2f (%.2f with no action), test cost %s, "
                 "%s of test rows acted on", chosen.threshold, chosen.val["cost"], chosen.val["cost_if_no_action"],
                 f"{chosen.test['cost']:.2f}" if chosen.test else "-",
                 f"{chosen.test['action_rate']:.4%}" if chosen.test else "-")

    baseline: dict[str, dict[str, Any]] | None = None
    if ev.baseline:
        train_info = prepared.split("train")
        with timed("evaluate: logistic-regression baseline"):
            train = spark.read.parquet(train_info.url)
            lr = fit_baseline(train, prepared.feature_state, ev.baseline_max_train_rows, train_info.rows,
                              seed=cfg.training.seed, max_iter=ev.baseline_max_iter)
            baseline = evaluate_scores_by(baseline_scores(lr, both, prepared.feature_state), "split",
                                          **_metric_args(cfg), what="baseline")
    gbt: dict[str, dict[str, Any]] | None = None
    if ev.baseline and ev.gbt_baseline:
        with timed(f"evaluate: gradient-boosted trees baseline ({ev.gbt_max_iter} trees)"):
            trees = fit_gbt_baseline(train, prepared.feature_state,
                                     ev.gbt_max_train_rows, train_info.rows, seed=cfg.training.seed,
                                     max_iter=ev.gbt_max_iter, max_depth=ev.gbt_max_depth)
            gbt = evaluate_scores_by(baseline_scores(trees, both, prepared.feature_state, nominal=False), "split",
                                     **_metric_args(cfg), what="GBT baseline")

    decision: reg_mod.GateDecision | None = None
    registry: reg_mod.Registry | None = None
    champion_metrics: dict[str, Any] | None = None
    metric = ev.gate.metric
    if gate:
        if "test" not in metrics:
            raise DataContractError(f"{prepared.url}: the test split is empty; the quality gate needs it")
        registry = reg_mod.Registry(reg_mod.registry_root(cfg))
        champ = registry.champion()
        new_value = metrics["test"][metric]
        compared_on = "test shards"
        if champ is not None and champ["model_version"] != version:
            champion_metrics, rescored, compared_on = champion_comparison(
                spark, cfg, registry, champ, prepared, frames["test"], saved_model)
            if rescored is not None:
                new_value = rescored[metric]
        decision = reg_mod.decide(
            metric, ev.gate.tolerance, version, new_value,
            champ["model_version"] if champ else None,
            (champion_metrics or {}).get(metric, metrics["test"][metric]) if champ else None,
        )
        if ev.gate.vs_baseline is not None:
            decision = reg_mod.against_baseline(decision, metrics["test"][metric],
                                                (baseline or {}).get("test", {}).get(metric), ev.gate.vs_baseline)

    scalars = {s: scalar_metrics(m) for s, m in metrics.items()}
    base_scalars = {s: scalar_metrics(m) for s, m in baseline.items()} if baseline else None
    # the gate's own tolerance when it compares with the baseline, so the report never contradicts it
    versus = compare_with_baseline(scalars, base_scalars,
                                   ev.gate.tolerance if ev.gate.vs_baseline is None else ev.gate.vs_baseline)
    for item in (versus or {}).get("worse", []):
        LOG.warning("evaluate: model %s is worse than the LR baseline: %s", version, item)
    gbt_scalars = {s: scalar_metrics(m) for s, m in gbt.items()} if gbt else None
    versus_gbt = compare_with_baseline(scalars, gbt_scalars, ev.gate.tolerance)
    for item in (versus_gbt or {}).get("worse", []):
        LOG.warning("evaluate: model %s is worse than the GBT baseline: %s", version, item)
    gate_info = None
    if decision is not None:
        gate_info = {**reg_mod.jsonable(asdict(decision)), "compared_on": compared_on,
                     "registry": str(registry.root) if registry else None}
    report_url = layout.report
    card["metrics"] = scalars
    card["baseline"] = base_scalars
    card["vs_baseline"] = versus
    card["baseline_gbt"] = gbt_scalars
    card["vs_baseline_gbt"] = versus_gbt
    card["decision"] = chosen.to_card() if chosen else None  # None: score writes no decision column
    card["evaluation"] = {
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_version": prepared.data_version, "scores": scores_url,
        "report": layout.report_html,
        "baseline_model": "spark.ml LogisticRegression (L2 1e-4, numerics + one-hot)" if baseline else None,
        "gbt_baseline_model": (f"spark.ml GBTClassifier ({ev.gbt_max_iter} trees, depth {ev.gbt_max_depth}, "
                               f"<= {ev.gbt_max_train_rows} train rows)") if gbt else None,
        "gate": gate_info,
    }
    model.write_card(reg_mod.jsonable(card))

    full = {"model": metrics, "baseline": baseline, "baseline_gbt": gbt, "champion_test": champion_metrics}
    with timed("evaluate: report"):
        report = _write_report_to(
            report_url, metrics=metrics, baseline=baseline, gbt=gbt, model_card=card, manifest=prepared.manifest,
            history=model.history(), gate=gate_info, champion=champion_metrics,
            decision=card["decision"], decision_curve=curve,
        )
        storage.write_json_atomic(layout.report_metrics, reg_mod.jsonable(full))

    result: dict[str, Any] = {
        "model_version": version, "data_version": prepared.data_version, "metrics": scalars,
        "baseline": base_scalars, "vs_baseline": versus, "baseline_gbt": gbt_scalars, "vs_baseline_gbt": versus_gbt,
        "report": report, "scores": scores_url, "gate": gate_info, "decision": card["decision"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if decision is not None and registry is not None:
        local_model, tmp = _local_model_copy(model.root)
        try:
            result["champion"] = reg_mod.enforce(
                registry, decision, local_model,
                {"val": scalars.get("val"), "test": scalars.get("test"), "baseline": base_scalars,
                 "data_version": prepared.data_version},
                reg_mod.TrainedOn(feature_state=prepared.feature_state, manifest=prepared.manifest),
                data_version=prepared.data_version, name=cfg.name,
            )
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    LOG.info("evaluate: model %s test %s=%s (%.1fs)", version, metric,
             scalars.get("test", {}).get(metric), result["seconds"])
    return result
