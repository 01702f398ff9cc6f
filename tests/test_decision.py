"""training/decision.py: the threshold chosen on val minimises the configured cost (checked by brute force
over the rows themselves), within the alert budget; the test operating point is the same rule on test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from downpour.training import decision as D


def _rows(n: int, seed: int) -> pd.DataFrame:
    """Scores that mean something: positives (2 %) score higher on average; amounts vary per row."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.02).astype(int)
    score = np.clip(rng.normal(0.15 + 0.5 * label, 0.15), 0, 1)
    return pd.DataFrame({"score": score, "label": label, "missed_cost": rng.lognormal(4, 1, n)})


def brute_force_cost(rows: pd.DataFrame, threshold: float | None, costs: D.Costs, per_row: bool) -> float:
    """The cost of acting on every row with score >= threshold, from the rows themselves (no buckets, no
    cumulative sums)."""
    score, label = rows["score"].to_numpy(), rows["label"].to_numpy()
    acted = np.zeros(len(rows), dtype=bool) if threshold is None else score >= threshold
    missed = rows["missed_cost"].to_numpy() if per_row else np.full(len(rows), costs.missed)
    return float(costs.action * acted.sum() + costs.false_positive * (acted & (label == 0)).sum()
                 + missed[~acted & (label == 1)].sum())


def assert_minimises(rows: pd.DataFrame, threshold: float | None, costs: D.Costs, per_row: bool,
                     max_action_rate: float | None = None) -> None:
    """No candidate (every distinct bucket value, and acting on nothing) within the budget is cheaper."""
    candidates = [None, *sorted({np.floor(s * D.RESOLUTION) / D.RESOLUTION for s in rows["score"]})]
    def allowed(t: float | None) -> bool:
        acted = 0 if t is None else int((rows["score"] >= t).sum())
        return max_action_rate is None or acted <= max_action_rate * len(rows)
    assert allowed(threshold)
    best = min(brute_force_cost(rows, t, costs, per_row) for t in candidates if allowed(t))
    assert brute_force_cost(rows, threshold, costs, per_row) == pytest.approx(best, rel=1e-9)


def _decide(spark, val: pd.DataFrame, test: pd.DataFrame, **kw):
    cfg = SimpleNamespace(**{"action_cost": 5.0, "false_positive_cost": 20.0, "missed_cost": 100.0,
                             "missed_cost_column": None, "max_action_rate": None, **kw})
    return D.decide(spark.createDataFrame(val), spark.createDataFrame(test), cfg)


@pytest.mark.parametrize("per_row", [False, True])
def test_the_chosen_threshold_minimises_the_cost_on_val(spark, per_row):
    val, test = _rows(3000, 1), _rows(3000, 2)
    column = "amount" if per_row else None
    chosen, curve = _decide(spark, val, test, missed_cost_column=column)
    costs = D.Costs(5.0, 20.0, 100.0)
    assert_minimises(val, chosen.threshold, costs, per_row)
    assert chosen.val["cost"] == pytest.approx(brute_force_cost(val, chosen.threshold, costs, per_row))
    # test: the same threshold, its cost counted row by row on test
    assert chosen.test["cost"] == pytest.approx(brute_force_cost(test, chosen.threshold, costs, per_row))
    assert chosen.test["acted"] == int((test["score"] >= chosen.threshold).sum())
    assert chosen.val["savings"] > 0  # the scores are informative: acting beats doing nothing


def test_the_alert_budget_caps_the_rows_acted_on(spark):
    val, test = _rows(3000, 3), _rows(3000, 4)
    chosen, _ = _decide(spark, val, test, action_cost=0.0, false_positive_cost=0.0, max_action_rate=0.01)
    assert chosen.val["acted"] <= 30
    assert_minimises(val, chosen.threshold, D.Costs(0.0, 0.0, 100.0), False, max_action_rate=0.01)


def test_acting_on_nothing_is_chosen_when_every_action_costs_more(spark):
    val, test = _rows(500, 5), _rows(500, 6)
    chosen, _ = _decide(spark, val, test, action_cost=1e6)
    assert chosen.threshold is None and chosen.val["acted"] == 0 and chosen.test["acted"] == 0


def test_the_brute_force_check_catches_a_wrong_threshold(spark):
    """Companion: the neighbour of the chosen threshold (a chooser off by one bucket) fails the check."""
    val, test = _rows(3000, 1), _rows(3000, 2)
    chosen, curve = _decide(spark, val, test)
    i = int(np.nonzero(curve.thresholds == chosen.threshold)[0][0])
    for wrong in (curve.thresholds[i + 1], curve.thresholds[max(i - 1, 1)]):
        if wrong != chosen.threshold and brute_force_cost(val, wrong, D.Costs(5.0, 20.0, 100.0), False) != \
                pytest.approx(chosen.val["cost"]):
            with pytest.raises(AssertionError):
                assert_minimises(val, float(wrong), D.Costs(5.0, 20.0, 100.0), False)
            return
    pytest.fail("no neighbouring threshold with another cost: the companion proves nothing")


def test_float32_scores_are_acted_on_exactly_as_evaluate_counted(spark):
    """Scores are float32 in Spark: evaluate's buckets and score's decision column must pick the same rows
    (a float32 product would push some rows one bucket up)."""
    from pyspark.sql import functions as F

    from downpour.pipelines.score import _decision

    val = spark.createDataFrame(_rows(20000, 7)).withColumn("score", F.col("score").cast("float"))
    chosen, _ = D.decide(val, None, SimpleNamespace(action_cost=5.0, false_positive_cost=20.0, missed_cost=100.0,
                                                    missed_cost_column=None, max_action_rate=None))
    acted = val.where(_decision({"threshold": chosen.threshold})).count()
    assert acted == chosen.val["acted"] > 0


def test_score_buckets_are_computed_in_double_precision(spark):
    """Every float32 score's bucket is floor(score x 1e6) of its exact value; companion: the same product
    taken in float32 (what Spark does for a float column times an int) misplaces some rows."""
    from pyspark.sql import functions as F

    scores = np.random.default_rng(11).random(20000).astype(np.float32)
    df = spark.createDataFrame(pd.DataFrame({"score": scores})).withColumn("score", F.col("score").cast("float"))
    expected = np.floor(scores.astype(np.float64) * 1e6).astype(np.int64)
    got = np.array([r[0] for r in df.select(D.score_bucket(F.col("score"))).collect()])
    assert (got == expected).all()
    float32_product = np.array([r[0] for r in df.select(F.floor(F.col("score") * F.lit(1e6).cast("float"))).collect()])
    assert (float32_product != expected).any()
