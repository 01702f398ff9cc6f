"""Metrics computed in Spark equal scikit-learn's on the same sample (random, tied, extreme scores)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from downpour.training import metrics as M


def _sample(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":          # continuous, overlapping classes, ~20% positives
        y = (rng.random(n) < 0.2).astype(np.float64)
        s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y - 1.0)))
    elif kind == "ties":          # scores rounded to 2 decimals: many exact ties across classes
        y = (rng.random(n) < 0.35).astype(np.float64)
        s = np.round(np.clip(rng.beta(2, 3, n) + 0.15 * y, 0, 1), 2)
    elif kind == "coarse":        # only 4 distinct scores (a rule-like model)
        y = (rng.random(n) < 0.3).astype(np.float64)
        s = rng.choice([0.1, 0.4, 0.6, 0.9], size=n) * (0.7 + 0.3 * y)
        s = np.round(s, 3)
    elif kind == "rare":          # fraud-like: 0.5% positives, scores crowded near 0, float32
        y = (rng.random(n) < 0.005).astype(np.float64)
        s = (1 / (1 + np.exp(-(rng.normal(-7, 1.5, n) + 3.0 * y)))).astype(np.float32).astype(np.float64)
    elif kind == "perfect":
        y = (rng.random(n) < 0.5).astype(np.float64)
        s = np.where(y > 0, 0.6 + 0.4 * rng.random(n), 0.4 * rng.random(n))
    else:
        raise ValueError(kind)
    return y, s


CASES = [("random", 6000, 1), ("ties", 4000, 2), ("coarse", 3000, 3), ("rare", 20000, 4), ("perfect", 500, 5)]


@pytest.fixture(scope="module")
def tables(spark):
    """Every case in ONE Spark aggregation grouped by case (the path evaluation uses for val/test),
    with the numpy sample kept beside each table."""
    samples = {kind: _sample(kind, n, seed) for kind, n, seed in CASES}
    pdf = pd.concat([pd.DataFrame({"case": kind, "label": y.astype(np.float32), "score": s})
                     for kind, (y, s) in samples.items()])
    grouped = M.score_tables(spark.createDataFrame(pdf), by="case")
    assert set(grouped) == set(samples)
    return {kind: (y, s, grouped[kind]) for kind, (y, s) in samples.items()}


@pytest.mark.parametrize("kind", [c[0] for c in CASES])
def test_auc_ap_logloss_brier_match_sklearn(tables, kind):
    y, s, t = tables[kind]
    assert t.rows == len(y) and t.positives == int(y.sum()) and t.invalid == 0
    assert M.roc_auc(t) == pytest.approx(roc_auc_score(y, s), abs=1e-4)
    # the reported bound really bounds the error
    assert abs(M.roc_auc(t) - roc_auc_score(y, s)) <= M.auc_error_bound(t) + 1e-12
    assert M.average_precision(t) == pytest.approx(average_precision_score(y, s), abs=1e-4)
    m = M.metrics_from_table(t)
    c = np.clip(s, M.EPS_LOW, 1 - M.EPS)  # by hand: sklearn clips again at float64's eps
    assert m["log_loss"] == pytest.approx(-np.mean(y * np.log(c) + (1 - y) * np.log1p(-c)), rel=1e-9)
    if (s > 1e-15).all():
        assert m["log_loss"] == pytest.approx(log_loss(y, np.clip(s, 1e-15, 1 - 1e-15)), rel=1e-9)
    assert m["brier"] == pytest.approx(brier_score_loss(y, s), rel=1e-9)
    assert m["base_rate"] == pytest.approx(y.mean())


@pytest.mark.parametrize("kind", ["ties", "coarse"])
def test_exact_ties_are_exact(tables, kind):
    """Equal scores land in one bucket and get scikit-learn's half credit: no approximation at all."""
    y, s, t = tables[kind]
    assert M.auc_error_bound(t) == 0.0
    assert M.roc_auc(t) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(t) == pytest.approx(average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("kind", ["random", "ties", "rare"])
@pytest.mark.parametrize("fpr", [0.001, 0.01, 0.1])
def test_recall_at_fpr_matches_roc_curve(tables, kind, fpr):
    y, s, t = tables[kind]
    f, r, thr = roc_curve(y, s, drop_intermediate=False)
    ok = f <= fpr
    recall, threshold = M.recall_at_fpr(t, fpr)
    assert recall == pytest.approx(r[ok].max(), abs=2e-3 if kind == "rare" else 1e-9)
    # the threshold is an operating point: scoring >= it keeps the false-positive rate within budget
    neg = s[y == 0]
    assert (neg >= threshold).mean() <= fpr + 1e-9


@pytest.mark.parametrize("kind", ["random", "rare"])
def test_precision_at_k_matches_sorted_sample(tables, kind):
    y, s, t = tables[kind]
    order = np.argsort(-s, kind="stable")
    for k in (10, 100, 1000):
        assert M.precision_at_k(t, k) == pytest.approx(y[order[:k]].mean(), abs=0.02 if k == 10 else 2e-3)
    assert M.precision_at_k(t, 10 * len(y)) == pytest.approx(y.mean())  # k beyond the rows: all rows


def test_deciles_lift_and_gains(tables):
    y, s, t = tables["random"]
    dec = M.deciles(t)
    assert len(dec) == 10
    order = np.argsort(-s, kind="stable")
    chunks = np.array_split(y[order], 10)
    for d, chunk in zip(dec, chunks, strict=True):
        assert d["rows"] == pytest.approx(len(chunk), abs=1)
        assert d["rate"] == pytest.approx(chunk.mean(), abs=5e-3)
        assert d["lift"] == pytest.approx(chunk.mean() / y.mean(), abs=0.03)
    assert dec[-1]["cumulative_gain"] == pytest.approx(1.0)
    assert dec[-1]["cumulative_lift"] == pytest.approx(1.0)
    gains = [d["cumulative_gain"] for d in dec]
    assert gains == sorted(gains) and dec[0]["lift"] > 1.5  # an informative model front-loads positives


def test_calibration_matches_sklearn(tables):
    y, s, t = tables["random"]
    cal = M.calibration(t, bins=10)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
    assert len(cal) == len(prob_true)
    np.testing.assert_allclose([c["observed_rate"] for c in cal], prob_true, atol=2e-3)
    np.testing.assert_allclose([c["mean_score"] for c in cal], prob_pred, atol=2e-3)
    assert sum(c["rows"] for c in cal) == len(y)
    ece = M.expected_calibration_error(cal)
    assert 0 <= ece < 0.2


def test_curves_are_bounded_monotone_and_match_auc(tables):
    y, s, t = tables["rare"]
    c = M.curves(t, max_points=256)
    assert 3 <= len(c["fpr"]) <= 256 + 2
    assert c["fpr"][0] == 0.0 and c["fpr"][-1] == 1.0 and c["tpr"][-1] == 1.0
    assert np.all(np.diff(c["fpr"]) >= 0) and np.all(np.diff(c["tpr"]) >= 0)
    assert np.trapz(c["tpr"], c["fpr"]) == pytest.approx(roc_auc_score(y, s), abs=0.01)
    assert min(x for x in c["fpr"] if x > 0) < 1e-3  # dense where fraud teams look: low FPR


def test_histogram_counts_every_row(tables):
    y, _, t = tables["random"]
    h = M.score_histogram(t, bins=20)
    assert len(h["edges"]) == 21
    assert sum(h["positive"]) == y.sum() and sum(h["negative"]) == len(y) - y.sum()


def test_invalid_rows_are_excluded_and_counted(spark):
    rows = [(1.0, 0.9), (0.0, 0.1), (1.0, 0.7), (0.0, 0.8), (None, 0.5), (1.0, None), (0.0, float("nan")),
            (1.0, 1.5)]
    df = spark.createDataFrame(rows, "label double, score double")
    m = M.evaluate_scores(df, fpr_points=[0.5], precision_at=[2])
    assert m["rows"] == 4 and m["excluded_rows"] == 4
    assert m["roc_auc"] == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.9, 0.1, 0.7, 0.8]))
    assert m["precision_at_2"] == pytest.approx(0.5)
    assert set(m) >= {"curves", "histogram", "deciles", "calibration", "recall_at_fpr_0.5"}


def test_one_class_gives_nan_not_an_error(spark):
    df = spark.createDataFrame([(0.0, 0.2), (0.0, 0.3)], "label double, score double")
    m = M.evaluate_scores(df)
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"])
    s = M.scalar_metrics(m)
    assert s["roc_auc"] is None and s["rows"] == 2 and "curves" not in s


@pytest.mark.parametrize("kind", ["random", "ties", "rare"])
def test_in_memory_table_equals_spark_table(tables, kind):
    """table_from_arrays (small samples, report tests) buckets exactly like the Spark aggregation."""
    y, s, t = tables[kind]
    a = M.table_from_arrays(y, s)
    np.testing.assert_array_equal(a.n, t.n)
    np.testing.assert_array_equal(a.pos, t.pos)
    np.testing.assert_allclose(a.score_sum, t.score_sum, rtol=1e-12)
    assert a.log_loss_sum == pytest.approx(t.log_loss_sum, rel=1e-12)


def test_scores_far_below_1e_15_keep_their_order(spark, monkeypatch):
    """A rare-positive model's served scores reach 1e-20 and below (float32 holds them): buckets must not floor
    them. The companion puts the old floor (1e-15) back and shows the tie it made moves the AUC."""
    rng = np.random.default_rng(7)
    y = (rng.random(20_000) < 0.01).astype(np.float64)
    s = (1 / (1 + np.exp(-(rng.normal(-45, 5, y.size) + 12.0 * y)))).astype(np.float32).astype(np.float64)
    assert (s < 1e-15).mean() > 0.9  # most rows lie below the old floor
    pdf = pd.DataFrame({"label": y.astype(np.float32), "score": s.astype(np.float32)})
    table = M.score_table(spark.createDataFrame(pdf))
    exact = roc_auc_score(y, s)
    assert M.roc_auc(table) == pytest.approx(exact, abs=1e-4)
    monkeypatch.setattr(M, "EPS_LOW", 1e-15)
    assert abs(M.roc_auc(M.table_from_arrays(y, s)) - exact) > 5e-3
