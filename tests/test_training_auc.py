"""The AUC that early stopping follows resolves rare-positive scores crowded near zero."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from downpour.training.callbacks import SpreadAUC
from downpour.training.rank import METRIC_THRESHOLDS


def _exact_roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs in the right order (no ties here)."""
    order = np.argsort(p, kind="stable")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_spread_auc_matches_the_exact_figure_where_evenly_spaced_thresholds_do_not():
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.005).astype(np.float32)
    logits = np.where(y == 1, rng.normal(-4, 3, y.size), rng.normal(-11, 1.5, y.size))  # a fraud model's scores
    p = (1 / (1 + np.exp(-logits))).astype(np.float32)
    exact = _exact_roc_auc(y, p)
    spread, plain = SpreadAUC(num_thresholds=METRIC_THRESHOLDS), tf.keras.metrics.AUC(num_thresholds=METRIC_THRESHOLDS)
    spread.update_state(y, p)
    plain.update_state(y, p)
    assert abs(float(spread.result()) - exact) < 2e-3
    # the companion: the stock metric on the same scores, which is what training followed before
    assert abs(float(plain.result()) - exact) > 5e-3
    pr = SpreadAUC(num_thresholds=METRIC_THRESHOLDS, curve="PR")
    pr.update_state(y, p)
    assert 0 < float(pr.result()) <= 1


def test_spread_auc_resolves_logits_far_below_minus_16():
    """A fraud model puts its negatives near logit -30 (p ~ 1e-13). The metric clips p only at float32's
    smallest normal number; the companion applies the old clip at 1e-7, which tied every row below
    logit -16 and moved the AUC that early stopping follows."""
    rng = np.random.default_rng(1)
    y = (rng.random(20_000) < 0.01).astype(np.float32)
    logits = np.where(y == 1, rng.normal(-8, 6, y.size), rng.normal(-30, 4, y.size))
    p = (1 / (1 + np.exp(-logits))).astype(np.float32)
    exact = _exact_roc_auc(y, p)
    spread = SpreadAUC(num_thresholds=METRIC_THRESHOLDS)
    spread.update_state(y, p)
    assert abs(float(spread.result()) - exact) < 2e-3
    old = tf.keras.metrics.AUC(num_thresholds=METRIC_THRESHOLDS)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    old.update_state(y, 1 / (1 + np.exp(-(np.log(q) - np.log1p(-q)) / 16.0)))
    assert abs(float(old.result()) - exact) > 5e-3
