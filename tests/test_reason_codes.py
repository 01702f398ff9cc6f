"""Reason codes (training/explain.py): the explain path is the model, its attributions add up to
score - baseline score, a path too coarse or a wrong baseline is caught by the same check, and the
top-k selection scoring writes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from downpour.artifact import completeness_gap
from downpour.config import TrainingConfig
from downpour.pipelines.serving import top_reasons
from downpour.training.explain import Explainer, feature_groups
from downpour.training.export import correct
from downpour.training.model import build_model

STATE = {
    "numeric": [{"name": "n__amount", "source": "amount"}, {"name": "n__card_count_24h", "source": "card_count_24h"}],
    "flags": [{"name": "n__amount__missing", "source": "amount"}],
    "categorical": [
        {"name": "c__country", "sources": ["country"], "kind": "vocab", "cardinality": 7, "embedding_dim": 3},
        {"name": "c__ip_country", "sources": ["ip_country"], "kind": "vocab", "cardinality": 9, "embedding_dim": 2},
        {"name": "c__ts_hour", "sources": ["ts"], "kind": "hour", "cardinality": 25, "embedding_dim": 4},
    ],
    "crosses": [{"name": "c__country_x_ip_country", "sources": ["c__country", "c__ip_country"], "cardinality": 63}],
}
SHIFT = -2.5  # a downsampled model's prior correction: the explained score is the served one


def batch(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "n__amount": rng.normal(size=n).astype("float32"),
        "n__card_count_24h": rng.normal(size=n).astype("float32"),
        "n__amount__missing": rng.integers(0, 2, n).astype("float32"),
        "c__country": rng.integers(0, 7, n), "c__ip_country": rng.integers(0, 9, n),
        "c__ts_hour": rng.integers(0, 25, n), "c__country_x_ip_country": rng.integers(0, 63, n),
    }


@pytest.fixture(scope="module")
def explained():
    model = build_model(STATE, TrainingConfig(hidden_units=[16, 8], dropout=0.0, seed=5))
    rng = np.random.default_rng(1)
    for v in model.weights:  # random weights everywhere: the wide part starts at zero
        v.assign(rng.normal(scale=0.4, size=v.shape).astype("float32"))
    ex = Explainer(model, STATE, SHIFT)
    base = ex.baseline([batch(300, 10), batch(212, 11)])  # "train" rows
    rows = batch(64, 20)
    cols = {k: tf.constant(v) for k, v in rows.items()}
    return model, ex, base, rows, cols


def _contrib(ex, cols, base, alphas):
    return ex.contributions(cols, base, tf.constant(alphas, tf.float32)).numpy()


def test_names_are_raw_column_terms():
    assert feature_groups(STATE) == [
        ("amount", ["n__amount", "n__amount__missing"]), ("card_count_24h", ["n__card_count_24h"]),
        ("country", ["c__country"]), ("ip_country", ["c__ip_country"]), ("ts hour", ["c__ts_hour"]),
        ("country x ip_country", ["c__country_x_ip_country"]),
    ]
    # the user's column names, where the safe names differ
    shown = [n for n, _ in feature_groups(STATE, {"amount": "Amount", "country": "Country", "ts": "TS"})]
    assert shown == ["Amount", "card_count_24h", "Country", "ip_country", "TS hour", "Country x ip_country"]


def test_explain_path_scores_what_the_model_serves(explained):
    model, ex, _, rows, cols = explained
    served = correct(np.asarray(model(rows, training=False)).reshape(-1), SHIFT)
    mine = tf.sigmoid(ex.logit(ex.represent(cols))).numpy()
    np.testing.assert_allclose(mine, served, atol=1e-5)


def test_attributions_add_up_to_score_minus_baseline_score(explained):
    _, ex, base, _, cols = explained
    score = tf.sigmoid(ex.logit(ex.represent(cols))).numpy()
    b = ex.baseline_score(base)
    contrib = _contrib(ex, cols, base, np.linspace(0, 1, 257))
    assert contrib.shape == (64, 6)
    spread = np.abs(score - b)
    assert spread.max() > 0.05  # the rows are really far from the baseline: the check has teeth
    fine = completeness_gap(contrib, score, b)
    assert fine.max() < 1e-3
    # the default 16 steps stay within the warning line scoring uses; more steps close the gap (the
    # ReLU kinks make the trapezoid rule converge like 1/steps)
    coarse = completeness_gap(_contrib(ex, cols, base, np.linspace(0, 1, 17)), score, b)
    assert coarse.max() < 0.01
    assert fine.max() < coarse.max() / 4


def test_companion_a_coarse_path_or_a_wrong_baseline_is_caught(explained):
    """The same check fails when the mechanism is broken: two path points (gradient x input at the ends)
    on a non-linear model, or attributions against a baseline other than the one the card names."""
    _, ex, base, _, cols = explained
    score = tf.sigmoid(ex.logit(ex.represent(cols))).numpy()
    b = ex.baseline_score(base)
    assert completeness_gap(_contrib(ex, cols, base, [0.0, 1.0]), score, b).max() > 1e-2
    zeros = {k: np.zeros_like(v) for k, v in base.items()}
    assert completeness_gap(_contrib(ex, cols, zeros, np.linspace(0, 1, 257)), score, b).max() > 1e-2


def test_top_reasons_are_the_largest_positive_contributions():
    contrib = np.array([[0.1, -0.3, 0.4, 0.0], [-0.1, -0.2, -0.3, -0.4], [0.2, 0.2, 0.05, 0.3]])
    names, values = top_reasons(contrib, ("a", "b", "c", "d"), 3)
    assert names.tolist() == [["c", "a", None], [None, None, None], ["d", "a", "b"]]
    np.testing.assert_allclose(values[0, :2], [0.4, 0.1])
    assert np.isnan(values[0, 2]) and np.isnan(values[1]).all()
    names, _ = top_reasons(contrib, ("a", "b", "c", "d"), 10)  # k above the number of features
    assert names.shape == (3, 4)
