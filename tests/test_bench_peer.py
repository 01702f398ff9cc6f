"""The peer benchmark (benchmarks/peer_estimator.py) is a fair race: Horovod's KerasEstimator gets our
network, and both contenders get the same rows, epochs, batch size, workers and optimizer steps.

A full ``measure()`` run takes minutes even on a few thousand rows (two Horovod launches, prepare,
per-row ``KerasModel.transform``), so nothing is trained here: ``make bench``'s call
(``benchmarks/run.py``) runs the real ``measure()`` up to the point where each side would start, with
a small prepared data set standing in for ``api.prepare``'s, and the objects each side would be
handed are inspected: our training plan (``training.plan.make_plan``, what ``api.train`` hands every
rank) and the rows our ranks' input pipeline reads, against the peer's KerasEstimator and the
DataFrames it would fit and transform (``peer_setup``, what ``run_peer`` fits).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

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

# petastorm 0.13 warns about pyarrow's legacy dataset API on every reader it opens
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_peer_network_matches_ours() -> None:
    from benchmarks.peer_estimator import peer_model
    from downpour.training.model import build_model, input_columns

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


class _Stop(Exception):
    """Raised where the peer's fit would start: everything both sides are given exists by then."""


def _handed_over(spark, tmp_path, monkeypatch, mode):
    """Run ``make bench``'s peer section for ``mode`` up to the start of the peer's fit; returns what
    ``measure()`` gave our side and the peer's."""
    from benchmarks import peer_estimator as pe
    from benchmarks import run
    from benchmarks.synthetic import write_prepared
    from downpour.training.input import open_prepared

    got = {}

    def fake_ours(spark_, cfg, scores_url):  # api.prepare's output stands in; train/score not run
        got["ours_cfg"] = cfg
        write_prepared(cfg.output.path, {"train": 5000, "val": 1500, "test": 1000}, row_group_rows=1000,
                       files=2, positive_rate=0.05, seed=5)
        return {"prepared": open_prepared(cfg.output.path)}

    def fake_peer(spark_, cfg, prepared, workdir, scores_url, seed):
        got.update(peer_cfg=cfg, prepared=prepared, workdir=workdir, seed=seed)
        raise _Stop

    import downpour.api  # noqa: F401 - bound to the real get_spark now, not to the stand-in below for good
    import downpour.cli  # noqa: F401

    monkeypatch.setattr("downpour.spark.get_spark", lambda **_: spark)
    monkeypatch.setattr(run, "machine", lambda: {})
    monkeypatch.setattr(pe, "raw_data", lambda *a, **k: str(tmp_path / "raw-not-generated"))
    monkeypatch.setattr(pe, "warm_up", lambda *a, **k: 0.0)  # its own pair; the measured pairs are checked here
    monkeypatch.setattr(pe, "run_ours", fake_ours)
    monkeypatch.setattr(pe, "run_peer", fake_peer)
    with pytest.raises(_Stop):
        run.run(mode, {"peer"}, str(tmp_path / "bench"))
    return got


def _row_hashes(pdf: pd.DataFrame, cols: list[str]) -> np.ndarray:
    """One 64-bit hash per row over ``cols`` in the shard dtypes, sorted: equal arrays = the same
    multiset of rows (count and content), whatever the order."""
    typed = pd.DataFrame({c: pdf[c].to_numpy(np.int64 if c.startswith("c__") else np.float32) for c in cols})
    return np.sort(pd.util.hash_pandas_object(typed, index=False).to_numpy())


def _ours_rows(info, spec, size, batch, keep_negatives=1.0, positive_weight=1.0) -> pd.DataFrame:
    """One pass over a split as our ranks' input pipeline reads it (every rank's shard)."""
    from downpour.training.input import ReadOptions, iter_batches

    parts = []
    for rank in range(size):
        opts = ReadOptions(batch_size=batch, rank=rank, size=size, shard=info.row_groups >= size, num_epochs=1,
                           shuffle=False, keep_negatives=keep_negatives, positive_weight=positive_weight,
                           reader_workers=1)
        parts += [pd.DataFrame(b) for b in iter_batches(info.url, spec, opts)]
    return pd.concat(parts, ignore_index=True)


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_both_contenders_get_the_same_rows_epochs_batches_and_steps(spark, tmp_path, monkeypatch, mode):
    import tensorflow as tf
    from pyspark.sql import functions as F

    from benchmarks import peer_estimator as pe
    from downpour.training.input import InputSpec
    from downpour.training.plan import make_plan

    got = _handed_over(spark, tmp_path, monkeypatch, mode)
    cfg, prepared = got["ours_cfg"], got["prepared"]
    assert got["peer_cfg"] is cfg  # one config for both sides
    assert prepared.url.startswith(cfg.output.path)  # the peer reads the shards ours prepared
    t = cfg.training
    plan = make_plan(cfg, prepared, fresh=True)  # what api.train(cfg, fresh=True) hands every rank
    peer = pe.peer_setup(spark, cfg, prepared, got["workdir"], got["seed"])  # what run_peer fits
    est = peer.estimator

    # same workers, epochs, per-worker batch, base learning rate; one optimizer step per batch
    assert (est.getNumProc(), est.getEpochs(), est.getBatchSize()) == (t.workers, t.epochs, t.batch_size)
    assert est.getBackwardPassesPerStep() == 1 and est.getTrainStepsPerEpoch() is None
    assert float(tf.keras.backend.get_value(est.getOptimizer().learning_rate)) == pytest.approx(t.learning_rate)
    assert est.getValidation() == pe.VAL_COL and est.getLabelCols() == ["label"]
    assert est.getSampleWeightCol() is None and plan.positive_weight == 1.0  # no class weights either side
    assert t.early_stopping_patience == 0 or t.early_stopping_patience >= t.epochs  # ours runs every epoch

    # the same train rows (ours: every rank's shard through the input pipeline, after its negative
    # downsampling; the peer: its fit DataFrame's non-validation rows), and the same val and test rows
    spec = InputSpec.from_feature_state(plan.feature_state)
    cols = [*peer.features, "label"]
    assert sorted(cols) == sorted([*spec.features, spec.label])
    train, val = prepared.split("train"), prepared.split("val")
    ours_train = _ours_rows(train, spec, t.workers, t.batch_size, plan.keep_negatives, plan.positive_weight)
    ours_val = _ours_rows(val, spec, t.workers, t.batch_size)
    peer_train = peer.fit_df.where(F.col(pe.VAL_COL) == 0).select(*cols).toPandas()
    peer_val = peer.fit_df.where(F.col(pe.VAL_COL) == 1).select(*cols).toPandas()
    assert len(ours_train) == len(peer_train) == train.rows
    np.testing.assert_array_equal(_row_hashes(ours_train, cols), _row_hashes(peer_train, cols))
    assert len(ours_val) == len(peer_val) == val.rows
    np.testing.assert_array_equal(_row_hashes(ours_val, cols), _row_hashes(peer_val, cols))
    ours_test = spark.read.parquet(prepared.split("test").url).select("row_id", *cols).toPandas()
    peer_test = peer.test_df.toPandas()
    np.testing.assert_array_equal(_row_hashes(ours_test, cols), _row_hashes(peer_test, cols))
    assert sorted(ours_test["row_id"]) == sorted(peer_test["row_id"])

    # the same optimizer steps per epoch: ours from the plan; the peer's as Horovod's KerasEstimator
    # derives them when train_steps_per_epoch is None (horovod/spark/keras/remote.py:
    # ceil(train_rows / batch_size / hvd.size())), from the train rows it is given
    peer_steps = int(math.ceil(len(peer_train) / est.getBatchSize() / est.getNumProc()))
    assert plan.steps_per_epoch == peer_steps
    assert plan.steps_per_epoch * t.epochs == peer_steps * est.getEpochs()
