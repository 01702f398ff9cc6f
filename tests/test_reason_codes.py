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
from downpour.training.export import same_scores, served_score
from downpour.training.model import build_model, logit_model

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
    served = served_score(logit_model(model)(rows, training=False), SHIFT)
    mine = tf.sigmoid(ex.logit(ex.represent(cols))).numpy()
    assert same_scores(mine, served), np.max(np.abs(mine / served - 1))


def _without(*keys: str) -> dict:
    return {**STATE, **{k: [] for k in keys}}


@pytest.mark.parametrize("state,dropout", [
    (_without("crosses"), 0.0), (_without("categorical", "crosses"), 0.0), (_without("numeric", "flags"), 0.0),
    (STATE, 0.4),  # dropout is off when explaining, as when serving
], ids=["no-crosses", "numerics-only", "categoricals-only", "dropout"])
def test_explain_path_is_the_model_for_every_shape_of_feature_state(state, dropout):
    model = build_model(state, TrainingConfig(hidden_units=[8], dropout=dropout, seed=2))
    rng = np.random.default_rng(4)
    for v in model.weights:
        v.assign(rng.normal(scale=0.4, size=v.shape).astype("float32"))
    ex = Explainer(model, state, SHIFT)
    rows = {k: v for k, v in batch(32, 6).items() if k in ex.columns}
    cols = {k: tf.constant(v) for k, v in rows.items()}
    served = served_score(logit_model(model)(rows, training=False), SHIFT)
    assert same_scores(tf.sigmoid(ex.logit(ex.represent(cols))).numpy(), served)
    base = ex.baseline([{k: v for k, v in batch(256, 7).items() if k in ex.columns}])
    contrib = _contrib(ex, cols, base, np.linspace(0, 1, 129))
    assert contrib.shape == (32, len(ex.groups))
    assert completeness_gap(contrib, served, ex.baseline_score(base)).max() < 5e-3


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


def test_a_model_without_the_explain_signature_is_refused_before_any_work(conf_dir, monkeypatch):
    """Reason codes asked of a model trained before them: a data-contract error (exit 3) naming the key,
    raised from the card alone, before Spark reads a row."""
    from downpour.config import load_config
    from downpour.errors import DataContractError
    from downpour.pipelines.score import _reasons

    monkeypatch.setenv("DOWNPOUR_PII_SALT", "x")
    on = load_config(conf_dir / "crm_telco.yaml", ["input.path=/nowhere", "scoring.reason_codes.enabled=true",
                                                   "scoring.reason_codes.top_k=2"])
    old = {"model_version": "v-old", "signatures": {"serve_features": [], "serving_default": []}}
    with pytest.raises(DataContractError, match=r"scoring\.reason_codes: model v-old has no 'explain'"):
        _reasons(on, old)
    new = {**old, "signatures": {**old["signatures"], "explain": []},
           "explain": {"features": ["tenure", "Contract"], "baseline_score": 0.2}}
    got = _reasons(on, new)
    assert got.features == ("tenure", "Contract") and got.top_k == 2 and got.steps == 16
    assert got.columns() == ["reason_1", "reason_1_contribution", "reason_2", "reason_2_contribution"]
    off = load_config(conf_dir / "crm_telco.yaml", ["input.path=/nowhere"])
    assert _reasons(off, old) is None


def test_a_row_with_non_finite_attributions_keeps_its_score_without_reasons():
    import pandas as pd

    from downpour.pipelines.serving import REASON_GAP, Reasons, _with_reasons

    reasons = Reasons("explain", ("a", "b", "c"), baseline_score=0.1, top_k=2, steps=16)
    out = pd.DataFrame({"score": np.array([0.4, 0.9, 0.1], dtype="float32")})
    got = {"score": out["score"].to_numpy(),
           "contributions": np.array([[0.2, 0.05, 0.05], [np.inf, 0.3, 0.1], [0.0, 0.0, 0.0]])}
    _with_reasons(out, got, reasons)
    assert out["reason_1"].tolist() == ["a", None, None] and out["reason_2"].tolist() == ["b", None, None]
    assert out["reason_1_contribution"][0] == pytest.approx(0.2) and np.isnan(out["reason_1_contribution"][1])
    gap = out[REASON_GAP].to_numpy()
    assert gap[0] == pytest.approx(0.0, abs=1e-7) and np.isnan(gap[1])  # null in Spark: counted as unexplained
    assert gap[2] == pytest.approx(0.0, abs=1e-7)  # at the baseline score: nothing to explain
