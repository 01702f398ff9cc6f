"""Wide global aggregations run as whole-stage generated code (downpour/spark.py::codegen_fields).

Spark leaves any operator with more than ``spark.sql.codegen.maxFields`` (100) input or output fields out
of whole-stage code generation. The fits' shared passes, drift's profile and the imputation means can
aggregate more values than that; they raise the limit for their action. What ran is read from Spark's own
record of the query (its SQL status store's final physical plan, where a compiled operator carries a
``*`` stage mark), found by the job description each test sets, and the checker is shown to see the slow
path when the same aggregation runs without the raised limit.
"""

from __future__ import annotations

import re
import uuid

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from downpour.spark import CODEGEN_FIELDS_KEY, aggregation_fields, codegen_fields

ROWS = 500


@pytest.fixture(autouse=True)
def _no_job_description_left(spark):
    """The tests tag their actions; a failing one must not leave its tag on the session's later jobs."""
    yield
    spark.sparkContext.setJobDescription(None)


def _frame(spark: SparkSession, numeric: int = 8, categorical: int = 0) -> DataFrame:
    rng = np.random.default_rng(3)
    data = {f"x{i}": rng.normal(size=ROWS) for i in range(numeric)}
    data.update({f"c{i}": rng.choice(["a", "b", "c"], ROWS) for i in range(categorical)})
    return spark.createDataFrame(pd.DataFrame(data))


def _aggs(df: DataFrame, per_column: int = 16) -> list[Column]:
    """More than 100 values: a count and ``per_column`` threshold counts per column."""
    out = [F.count(F.lit(1)).alias("n")]
    for c in df.columns:
        out += [F.sum(F.when(F.col(c) > k / per_column, 1).otherwise(0)).alias(f"{c}_{k}") for k in range(per_column)]
    return out


def _tagged(spark: SparkSession) -> str:
    """A job description for the next actions: the status store names their queries by it."""
    tag = f"codegen-fields-{uuid.uuid4().hex}"
    spark.sparkContext.setJobDescription(tag)
    return tag


def _aggregates(spark: SparkSession, tag: str) -> list[str]:
    """The aggregation lines of the final plans of every query described by ``tag``, as Spark's UI keeps
    them (``spark.sql.ui.explainMode``: formatted, or the tree of the others)."""
    spark.sparkContext.setJobDescription(None)
    spark.sparkContext._jsc.sc().listenerBus().waitUntilEmpty()  # the store is filled from the listener bus
    store = spark._jsparkSession.sharedState().statusStore().executionsList()
    lines, found = [], False
    for i in range(store.size()):
        execution = store.apply(i)
        if execution.description() == tag:
            found = True
            final = execution.physicalPlanDescription().split("== Final Plan ==")[-1].split("== Initial Plan ==")[0]
            tree = final.split("\n\n")[0]  # the formatted mode's details follow the tree
            lines += [line.strip() for line in tree.splitlines() if "HashAggregate" in line]
    assert found, f"no query described {tag!r} in Spark's status store"
    return lines


def _compiled(lines: list[str]) -> bool:
    """Each a whole-stage compiled operator: ``* HashAggregate (5)`` or ``*(2) HashAggregate(...)``."""
    return bool(lines) and all(re.match(r"^[+\- :]*\*(\(\d+\))? HashAggregate", line) for line in lines)


def test_a_wide_aggregation_runs_compiled_only_with_the_raised_limit(spark):
    df = _frame(spark)
    aggs = _aggs(df)
    assert len(aggs) > 100
    assert spark.conf.get(CODEGEN_FIELDS_KEY, None) is None
    tag = _tagged(spark)
    plain = df.agg(*aggs).first()
    slow = _aggregates(spark, tag)
    assert slow and not _compiled(slow), slow  # the checker sees Spark's fallback
    tag = _tagged(spark)
    with codegen_fields(spark, aggregation_fields(df, len(aggs))):
        assert int(spark.conf.get(CODEGEN_FIELDS_KEY)) >= 4 * len(aggs)
        fast = df.agg(*aggs).first()
    assert _compiled(_aggregates(spark, tag)), _aggregates(spark, tag)
    assert spark.conf.get(CODEGEN_FIELDS_KEY, None) is None, "the session's own setting comes back"
    assert fast == plain
    with codegen_fields(spark, 30):  # below Spark's default: never lowered
        assert spark.conf.get(CODEGEN_FIELDS_KEY, None) is None
    spark.conf.set(CODEGEN_FIELDS_KEY, "100000")  # a higher setting of the session's stays
    try:
        with codegen_fields(spark, 500):
            assert spark.conf.get(CODEGEN_FIELDS_KEY) == "100000"
        assert spark.conf.get(CODEGEN_FIELDS_KEY) == "100000"
    finally:
        spark.conf.unset(CODEGEN_FIELDS_KEY)


def test_the_bound_counts_nested_fields_as_spark_does(spark):
    schema = T.StructType([T.StructField("a", T.LongType()),
                           T.StructField("s", T.StructType([T.StructField("b", T.StringType()),
                                                            T.StructField("c", T.ArrayType(T.DoubleType()))])),
                           T.StructField("m", T.MapType(T.StringType(), T.LongType()))])
    assert aggregation_fields(spark.createDataFrame([], schema), 10) == 5 + 40


def test_the_shared_passes_run_their_wide_aggregation_compiled(spark):
    from downpour.features.passes import Passes

    df = _frame(spark)
    passes = Passes()
    passes.aggregate(*_aggs(df))
    tag = _tagged(spark)
    row = passes.run(df).row
    assert _compiled(_aggregates(spark, tag)), _aggregates(spark, tag)
    assert spark.conf.get(CODEGEN_FIELDS_KEY, None) is None
    assert row["n"] == ROWS


def test_drifts_profile_runs_its_wide_aggregation_compiled(spark):
    """At conf/fraud.yaml's width: 18 numeric features (11 bin counts each), 8 categorical (2 counts each)
    and the row count, 215 values."""
    from downpour.features import drift

    df = _frame(spark, numeric=18, categorical=8)
    edges = [float(e) for e in np.linspace(-1.5, 1.5, 9)]
    ref = {"numeric": {f"x{i}": {"edges": edges, "shares": [0.1] * 10 + [0.0]} for i in range(18)},
           "categorical": {f"c{i}": {"values": ["a"]} for i in range(8)}}
    tag = _tagged(spark)
    out = drift.profile(df, ref, {c: c for c in df.columns})
    assert _compiled(_aggregates(spark, tag)), _aggregates(spark, tag)
    assert spark.conf.get(CODEGEN_FIELDS_KEY, None) is None
    assert out["rows"] == ROWS


def test_the_imputation_means_run_their_wide_aggregation_compiled(spark):
    """40 columns imputed with their mean: three values each in one aggregation, 120."""
    from downpour.config import config_from_dict
    from downpour.pipelines.clean import null_statistics

    raw = _frame(spark, numeric=40)
    cfg = config_from_dict({
        "name": "wide", "input": {"path": "/nowhere"}, "output": {"path": "/nowhere"},
        "schema": {"id": "string", **{c: "double" for c in raw.columns}, "y": "int"},
        "id_column": "id", "label": {"column": "y", "positive": 1},
        "cleaning": {"nulls": {c: {"action": "impute", "statistic": "mean"} for c in raw.columns}},
        "features": {"numeric": list(raw.columns)},
    })
    df = raw.select(*[F.col(c).alias(cfg.names[c]) for c in raw.columns])
    tag = _tagged(spark)
    stats = null_statistics(df, cfg)
    lines = _aggregates(spark, tag)
    assert _compiled(lines), lines
    expected = raw.toPandas().mean()
    assert all(abs(stats[c] - expected[c]) < 1e-9 for c in raw.columns), stats
