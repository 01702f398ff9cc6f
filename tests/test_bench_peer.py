"""The peer benchmark gives Horovod's KerasEstimator the same network as ours (benchmarks/peer_estimator.py).

A full ``measure()`` run takes minutes even on a few thousand rows (two Horovod launches, prepare,
per-row ``KerasModel.transform``), so this checks the fairness-critical part without Spark: the peer's
stock-Keras network has our model's inputs and exactly its number of trainable parameters.
"""

from __future__ import annotations

import numpy as np

from downpour.config import TrainingConfig

STATE = {
    "numeric": [{"name": "n__amount"}, {"name": "n__vel_count_1h"}],
    "flags": [{"name": "n__amount__missing"}],
    "categorical": [
        {"name": "c__country", "cardinality": 12, "embedding_dim": 4},
        {"name": "c__merchant_id", "cardinality": 2048, "embedding_dim": 16},
        {"name": "c__event_ts_hour", "cardinality": 25},  # no dim: both use the default rule
    ],
    "crosses": [{"name": "c__country_x_channel", "cardinality": 48}],
}


def test_peer_network_matches_ours() -> None:
    from benchmarks.peer_estimator import peer_model
    from training.model import build_model, input_columns

    tcfg = TrainingConfig(hidden_units=[32, 16], dropout=0.1)
    ours = build_model(STATE, tcfg)
    peer, features = peer_model(STATE, tcfg)

    assert features == list(input_columns(STATE))
    assert [i.name for i in peer.inputs] == features
    assert [i.shape.as_list() for i in peer.inputs] == [[None, 1]] * len(features)
    trainable = sum(int(np.prod(w.shape)) for w in peer.trainable_weights)
    assert trainable == sum(int(np.prod(w.shape)) for w in ours.trainable_weights)

    rows = 5
    batch = [np.zeros((rows, 1), np.int64) if f.startswith("c__") else np.ones((rows, 1), np.float32)
             for f in features]
    out = peer.predict_on_batch(batch)
    assert out.shape == (rows, 1)
    assert np.all((out > 0) & (out < 1))
