"""The baselines a deep model is compared with, fitted on train in Spark ML: logistic regression on
numerics + one-hot categoricals (what the wide part can represent), and gradient-boosted trees on a
bounded sample (what a tabular-data team would try first). Both read the model-ready shards.
"""

from __future__ import annotations

from typing import Any

from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import GBTClassifier, LogisticRegression
from pyspark.ml.feature import OneHotEncoder, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def _cardinalities(state: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: int(c["cardinality"]) for c in [*state.get("categorical", []), *state.get("crosses", [])]
            if c.get("cardinality")}


def baseline_frame(df: DataFrame, state: dict[str, Any],
                   nominal: bool = True) -> tuple[DataFrame, list[str], list[str]]:
    """The shard columns the baseline reads, categoricals tagged with their cardinality (ML metadata)
    when ``nominal``, so the one-hot width comes from the feature state, not from whichever indices
    train happens to hold."""
    cards = _cardinalities(state)
    numeric = [c for c in df.columns if c.startswith("n__")]
    categorical = [c for c in df.columns if c.startswith("c__")]
    cols = [F.col("label").cast("double").alias("label")]
    if "split" in df.columns:
        cols.append(F.col("split"))
    weight = state.get("weight")
    if weight and weight in df.columns:
        cols.append(F.col(weight).cast("double").alias("__weight"))
    cols += [F.col(c).cast("double").alias(c) for c in numeric]
    for c in categorical:
        meta = {"ml_attr": {"type": "nominal", "num_vals": cards[c], "name": c}} if nominal and c in cards else {}
        cols.append(F.col(c).cast("double").alias(c, metadata=meta))
    return df.select(*cols), numeric, categorical


def fit_baseline(train: DataFrame, state: dict[str, Any], max_rows: int, train_rows: int,
                 seed: int = 42, max_iter: int = 100) -> PipelineModel:
    """Logistic regression (L2, standardized) on numerics + one-hot categoricals, fitted on train."""
    frame, numeric, categorical = baseline_frame(train, state)
    frame = _bounded(frame, max_rows, train_rows, seed)
    onehot = [f"{c}__oh" for c in categorical]
    stages: list[Any] = []
    if categorical:
        stages.append(OneHotEncoder(inputCols=categorical, outputCols=onehot, handleInvalid="keep"))
    stages.append(VectorAssembler(inputCols=numeric + onehot, outputCol="__features", handleInvalid="keep"))
    lr = LogisticRegression(featuresCol="__features", labelCol="label", maxIter=max_iter, regParam=1e-4,
                            elasticNetParam=0.0, standardization=True, probabilityCol="__probability",
                            rawPredictionCol="__raw", predictionCol="__prediction")
    if "__weight" in frame.columns:
        lr.setWeightCol("__weight")
    stages.append(lr)
    return Pipeline(stages=stages).fit(frame)


def fit_gbt_baseline(train: DataFrame, state: dict[str, Any], max_rows: int, train_rows: int,
                     seed: int = 42, max_iter: int = 50, max_depth: int = 5) -> PipelineModel:
    """Gradient-boosted trees (Spark ML ``GBTClassifier``) on numerics + categorical codes, fitted on
    a bounded sample of train: what a tabular-data team compares a deep model with. Codes are read
    as ordered numbers (no nominal metadata): hashed and crossed columns have thousands of values,
    more than trees' bins, and depth lets the trees cut out the codes that matter."""
    frame, numeric, categorical = baseline_frame(train, state, nominal=False)
    frame = _bounded(frame, max_rows, train_rows, seed)
    gbt = GBTClassifier(featuresCol="__features", labelCol="label", maxIter=max_iter, maxDepth=max_depth,
                        stepSize=0.1, seed=seed, predictionCol="__prediction")
    gbt.setProbabilityCol("__probability").setRawPredictionCol("__raw")
    if "__weight" in frame.columns:
        gbt.setWeightCol("__weight")
    assemble = VectorAssembler(inputCols=numeric + categorical, outputCol="__features", handleInvalid="keep")
    return Pipeline(stages=[assemble, gbt]).fit(frame)


def _bounded(frame: DataFrame, max_rows: int, train_rows: int, seed: int) -> DataFrame:
    """At most ``max_rows`` rows of ``frame`` (``train_rows`` long), sampled without a count."""
    if train_rows <= max_rows:
        return frame
    return frame.sample(fraction=min(1.0, 1.05 * max_rows / train_rows), seed=seed).limit(max_rows)


def baseline_scores(model: PipelineModel, df: DataFrame, state: dict[str, Any], nominal: bool = True) -> DataFrame:
    """A baseline's scores of ``df``; ``nominal`` as the baseline was fitted (False for the trees)."""
    frame, _, _ = baseline_frame(df, state, nominal)
    out = model.transform(frame)
    return out.select("split", "label", vector_to_array("__probability")[1].alias("score"))
