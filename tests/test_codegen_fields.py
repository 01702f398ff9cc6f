"""Wide global aggregations run as whole-stage generated code (downpour/spark.py::codegen_fields).

Spark leaves any operator with more than ``spark.sql.codegen.maxFields`` (100) input or output fields out
of whole-stage code generation. The fits' shared passes and drift's profile aggregate more values than
that; they raise the limit for their action. What ran is read from Spark's own record of the query (its
SQL status store's final physical plan, where a compiled operator carries a ``*(n)`` stage mark), and the
checker is shown to see the slow path when the same aggregation runs without the raised limit.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from downpour.spark import CODEGEN_FIELDS_KEY, aggregation_fields, codegen_fields

MARK = "wide_agg_marker"  # an alias only these tests' aggregations carry


def _frame(spark: SparkSession, columns: int = 8, rows: int = 500) -> DataFrame:
    rng = np.random.default_rng(3)
    return spark.createDataFrame(pd.DataFrame({f"x{i}": rng.normal(size=rows) for i in range(columns)}))


def _aggs(df: DataFrame, per_column: int = 16) -> list:
    """More than 100 values: a count and ``per_column`` threshold counts per column."""
    out = [F.count(F.lit(1)).alias(MARK)]
    for c in df.columns:
        out += [F.sum(F.when(F.col(c) > k / per_column, 1).otherwise(0)).alias(f"{c}_{k}") for k in range(per_column)]
    return out


def _global_aggregates(spark: SparkSession) -> list[str]:
    """The aggregation lines of the final plan of the last query whose plan names ``MARK`` (all global
    here), as Spark's UI keeps it (``spark.sql.ui.explainMode``: formatted, or the tree of the others)."""
    store = spark._jsparkSession.sharedState().statusStore().executionsList()
    for i in reversed(range(store.size())):
        plan = store.apply(i).physicalPlanDescription()
        if MARK in plan:
            final = plan.split("== Final Plan ==")[-1].split("== Initial Plan ==")[0]
            tree = final.split("\n\n")[0]  # the formatted mode's details follow the tree
            return [line.strip() for line in tree.splitlines() if "HashAggregate" in line]
    raise AssertionError(f"no query with {MARK} in Spark's status store")


def _compiled(lines: list[str]) -> bool:
    """Each a whole-stage compiled operator: ``* HashAggregate (5)`` or ``*(2) HashAggregate(...)``."""
    return bool(lines) and all(re.match(r"^[+\- :]*\*(\(\d+\))? HashAggregate", line) for line in lines)


def test_a_wide_aggregation_runs_compiled_only_with_the_raised_limit(spark):
    df = _frame(spark)
    aggs = _aggs(df)
    assert len(aggs) > 100
    assert spark.conf.get(CODEGEN_FIELDS_KEY, None) is None
    plain = df.agg(*aggs).first()
    slow = _global_aggregates(spark)
    assert slow and not _compiled(slow), slow  # the checker sees Spark's fallback
    with codegen_fields(spark, aggregation_fields(df, len(aggs))):
        assert int(spark.conf.get(CODEGEN_FIELDS_KEY)) >= 4 * len(aggs)
        fast = df.agg(*aggs).first()
    assert _compiled(_global_aggregates(spark)), _global_aggregates(spark)
    assert spark.conf.get(CODEGEN_FIELDS_KEY, None) is None, "the session's own setting comes back"
    assert fast == plain
    spark.conf.set(CODEGEN_FIELDS_KEY, "100000")  # a higher setting of the session's stays
    try:
        with codegen_fields(spark, 500):
            assert spark.conf.get(CODEGEN_FIELDS_KEY) == "100000"
        assert spark.conf.get(CODEGEN_FIELDS_KEY) == "100000"
    finally:
        spark.conf.unset(CODEGEN_FIELDS_KEY)


def test_the_shared_passes_run_their_wide_aggregation_compiled(spark):
    from downpour.features.passes import Passes

    df = _frame(spark)
    passes = Passes()
    passes.aggregate(*_aggs(df))
    row = passes.run(df).row
    assert _compiled(_global_aggregates(spark)), _global_aggregates(spark)
    assert row[MARK] == 500


def test_drifts_profile_runs_its_wide_aggregation_compiled(spark):
    from downpour.features import drift

    features = 12  # 1 + 12 x 11 bin counts + 2 category counts: 135 values
    df = _frame(spark, columns=features).withColumn(MARK, F.lit("a"))
    edges = [float(e) for e in np.linspace(-1.5, 1.5, 9)]
    ref = {"numeric": {f"x{i}": {"edges": edges, "shares": [0.1] * 10 + [0.0]} for i in range(features)},
           "categorical": {MARK: {"values": ["a"]}}}
    names = {**{f"x{i}": f"x{i}" for i in range(features)}, MARK: MARK}
    out = drift.profile(df, ref, names)
    assert out["rows"] == 500
    assert _compiled(_global_aggregates(spark)), _global_aggregates(spark)
