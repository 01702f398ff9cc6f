"""The new model against what it is compared with: the champion on the same test rows (the gate), and
the baselines beside it (per split, the headline metrics).

A champion fitted on the same features is scored on the current test shards; one fitted on other
features (an earlier data version) is scored with the new model on the raw test rows, rebuilt from
the input with prepare's own chain (``pipelines/rows.py``) and the published imputation statistics."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour import storage
from downpour.artifact import FEATURES_SIGNATURE as FEATURE_SIGNATURE
from downpour.artifact import RAW_SIGNATURE, ModelArtifact
from downpour.config import Config
from downpour.errors import DataContractError
from downpour.features.state import serving_frame
from downpour.logs import LOG, timed
from downpour.pipelines.score import RawInputs
from downpour.pipelines.serving import arrow_batch_rows, score_dataframe, signature_inputs
from downpour.spark import persisting
from downpour.training import registry as reg_mod
from downpour.training.input import PreparedData
from downpour.training.metrics import evaluate_scores, evaluate_scores_by


def score_split(shards: DataFrame, saved_model: str, batch_rows: int) -> DataFrame:
    """(row_id, label, score) of model-ready shard rows, scored by ``serve_features`` (lazy)."""
    return score_dataframe(shards, saved_model, FEATURE_SIGNATURE, keep=["row_id", "label"],
                           batch_rows=batch_rows)


def metric_args(cfg: Config) -> dict[str, Any]:
    """The metric settings of `evaluation` every metrics pass takes (model, baselines, champion)."""
    ev = cfg.evaluation
    return {"fpr_points": ev.fpr_points, "precision_at": ev.precision_at_k, "resolution": ev.metric_resolution}


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

    split_df = rebuilt_splits(spark, cfg, prepared)
    with contract_errors(cfg):
        # the same rows as the published version's (its data version is checked): its clean count bounds them
        clean_rows = (prepared.manifest.get("counts") or {}).get("clean")
        rows = add_window_features(split_df, cfg, rows=clean_rows).where(F.col("split") == split)
        rows = clean.serving_nulls(rows, cfg)  # serving_default imputes and flags them itself
    return rows


def rebuilt_splits(spark: SparkSession, cfg: Config, prepared: PreparedData) -> DataFrame:
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
            m = evaluate_scores(scored, **metric_args(cfg), what=f"champion {champ['model_version']} test")
            return m, None, f"test shards ({FEATURE_SIGNATURE})"
        LOG.info("gate: champion %s has other features than data %s: comparing on raw test rows",
                 champ["model_version"], prepared.data_version)
        with persisting(spark) as stage:  # the raw rows are persisted, and released: see downpour/spark.py
            with timed("gate: rebuilding the raw test rows"):
                raw = stage.persist(raw_split_rows(spark, cfg, prepared))
            both = (_raw_scores(raw, saved, ev.score_batch_rows).withColumn("model", F.lit("champion"))
                    .unionByName(_raw_scores(raw, new_saved_model, ev.score_batch_rows)
                                 .withColumn("model", F.lit("new"))))
            by = evaluate_scores_by(both, "model", **metric_args(cfg), what="gate (raw test rows)")
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
