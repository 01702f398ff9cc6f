"""Training guarantees that a run alone would not show: a resumed run continues exactly where it
stopped, the (state, best weights) pair of a checkpoint is atomic, and early stopping ranks epochs by
the AUC over every rank's validation rows, not by a mean of per-rank AUCs."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from test_train import _config  # the same small config as the other training tests

from benchmarks.synthetic import write_prepared
from downpour.training.checkpoints import CheckpointStore

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ---- 9: pooled (global) validation AUC ---------------------------------------------------------------
def _rank_data(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two rank-shaped validation sets of different sizes, base rates and score ranges: each is
    ranked well on its own, but rank 1's negatives outscore rank 0's positives, so the pooled AUC is
    far from the mean of the two per-rank AUCs."""
    rng = np.random.default_rng(seed)
    out = []
    for n, rate, shift in ((900, 0.1, -1.5), (300, 0.5, 1.5)):
        y = (rng.random(n) < rate).astype(np.float32)
        z = rng.normal(0.0, 1.0, n) + 1.2 * y + shift
        out.append((y, (1.0 / (1.0 + np.exp(-z))).astype(np.float32)))
    return out


def _state(metrics: dict) -> np.ndarray:
    # the flat state in the order pooled_results sends it (sorted names, then each metric's variables)
    return np.concatenate([np.ravel(v.numpy()).astype(np.float64)
                           for n in sorted(metrics) for v in metrics[n].variables])


def _compiled_model():
    import tensorflow as tf

    x = tf.keras.Input(shape=(1,))
    model = tf.keras.Model(x, tf.keras.layers.Lambda(lambda t: t[:, 0])(x))  # the score is the input
    model.compile(optimizer="sgd", loss=tf.keras.losses.BinaryCrossentropy(),
                  metrics=[tf.keras.metrics.AUC(name="auc"), tf.keras.metrics.AUC(curve="PR", name="pr_auc")])
    return model


def test_early_stopping_sees_the_auc_of_all_ranks_rows_not_the_mean_of_per_rank_aucs():
    from sklearn.metrics import roc_auc_score

    from downpour.training.callbacks import PooledMetrics, additive_metrics

    (y0, p0), (y1, p1) = _rank_data(3)
    y, p = np.concatenate([y0, y1]), np.concatenate([p0, p1])
    pooled_truth = roc_auc_score(y, p)
    mean_of_ranks = (roc_auc_score(y0, p0) + roc_auc_score(y1, p1)) / 2
    assert abs(pooled_truth - mean_of_ranks) > 0.05  # the two notions really differ on these data

    # two "ranks" evaluate their own rows, as Keras' validation does inside fit on each worker
    ranks = [_compiled_model(), _compiled_model()]
    logs = [dict(m.evaluate(p_[:, None], y_, batch_size=64, verbose=0, return_dict=True)) for m, (y_, p_) in
            zip(ranks, ((y0, p0), (y1, p1)), strict=True)]
    per_rank_auc = [lg["auc"] for lg in logs]
    # the collectives, seen from rank 0: a sum is its own value plus rank 1's, a mean their average
    other_state = _state(additive_metrics(ranks[1]))
    other_logs = {"val_" + k: v for k, v in logs[1].items()}
    callback = PooledMetrics(sum_across_ranks=lambda flat: flat + other_state,
                             mean_across_ranks=lambda name, v: (v + other_logs[name]) / 2)
    callback.set_model(ranks[0])
    epoch_logs = {"val_" + k: v for k, v in logs[0].items()}
    callback.on_epoch_end(0, epoch_logs)

    # what training logs (and early stopping / the best epoch read) is the AUC of the union
    assert epoch_logs["val_auc"] == pytest.approx(pooled_truth, abs=2e-3)  # Keras AUC: 200 thresholds
    assert abs(epoch_logs["val_auc"] - np.mean(per_rank_auc)) > 0.05  # not the old averaged number
    # and it is exactly Keras' own AUC had one process evaluated every rank's rows
    union = _compiled_model()
    whole = union.evaluate(p[:, None], y, batch_size=64, verbose=0, return_dict=True)
    for key in ("auc", "pr_auc", "loss"):
        assert epoch_logs[f"val_{key}"] == pytest.approx(whole[key], rel=1e-5), key


# ---- 7: the (state, best weights) pair is committed atomically -----------------------------------------
def _tiny_model():
    import tensorflow as tf

    x = tf.keras.Input(shape=(3,))
    model = tf.keras.Model(x, tf.keras.layers.Dense(1)(x))
    opt = tf.keras.optimizers.legacy.Adam(0.01)
    model.compile(optimizer=opt, loss="mse")
    opt._create_all_weights(model.trainable_variables)
    return model


def _crash_before_latest_json(url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list, dict[int, list]]:
    """Epoch 1 is checkpointed as the best; epoch 2 is better, and the process dies after its weights
    were written but before ``latest.json`` was replaced. Returns what the resume/export path then
    reads: the state, the best weights it loads (None when it refuses them), each epoch's weights."""
    from downpour.training import checkpoints
    from downpour.training.callbacks import EpochRecorder

    model = _tiny_model()
    recorder = EpochRecorder(CheckpointStore(url, "key"), {}, "val_auc", None, 64)
    recorder.set_model(model)
    weights: dict[int, list] = {}
    for epoch, auc in ((0, 0.70), (1, 0.80)):
        weights[epoch + 1] = [np.full_like(w, epoch + 1.0) for w in model.get_weights()]
        model.set_weights(weights[epoch + 1])
        recorder.on_epoch_begin(epoch)
        if epoch == 1:
            def crash(target: str, obj: dict) -> None:
                raise KeyboardInterrupt("killed before latest.json was replaced")

            with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
                m.setattr(checkpoints.storage, "write_json_atomic", crash)
                recorder.on_epoch_end(epoch, {"val_auc": auc})
        else:
            recorder.on_epoch_end(epoch, {"val_auc": auc})

    store = CheckpointStore(url, "key")  # a new process resuming
    state = store.latest()
    fresh = _tiny_model()
    loaded = fresh.get_weights() if store.restore_best(fresh, state) else None
    return state, loaded, weights


def _consistent(state: dict, loaded: list | None, weights: dict[int, list]) -> bool:
    """The reader's view is a consistent pair: the best weights it loads are the recorded best epoch's."""
    best = state["best"]["epoch"]
    return loaded is not None and all(np.array_equal(a, b) for a, b in zip(loaded, weights[best], strict=True))


def test_crash_between_best_weights_and_latest_json_leaves_a_consistent_pair(tmp_path, monkeypatch):
    state, loaded, weights = _crash_before_latest_json(str(tmp_path / "ckpt"), monkeypatch)
    assert state["epoch"] == 1 and state["best"]["epoch"] == 1  # the old state is in charge
    assert _consistent(state, loaded, weights)  # ... with the old best weights, not epoch 2's


def test_the_consistency_check_catches_best_weights_replaced_in_place(tmp_path, monkeypatch):
    # break the mechanism: one fixed best/ directory, replaced before latest.json (the old scheme);
    # the check the test above relies on must then fail
    monkeypatch.setattr(CheckpointStore, "_best_name", lambda self, epoch: "best")
    state, loaded, weights = _crash_before_latest_json(str(tmp_path / "ckpt"), monkeypatch)
    assert state["best"]["epoch"] == 1
    assert loaded is not None and all(np.array_equal(a, b) for a, b in zip(loaded, weights[2], strict=True))
    assert not _consistent(state, loaded, weights)


def test_best_weights_of_another_epoch_than_the_recorded_best_are_never_loaded(tmp_path):
    # defence in depth for stores written otherwise: best-<epoch> is loaded only for that best epoch
    model = _tiny_model()
    store = CheckpointStore(str(tmp_path / "ckpt"), "key")
    state = store.save(model, model.optimizer, {"epoch": 2, "best": {"epoch": 2}}, best=True)
    assert state["best_path"] == "best-000002" and store.restore_best(_tiny_model(), state)
    assert not store.restore_best(_tiny_model(), {**state, "best": {"epoch": 1}})


# ---- 4: resume == uninterrupted ----------------------------------------------------------------------


def test_an_epoch_of_the_training_stream_is_the_same_whether_the_stream_starts_there_or_before(tmp_path):
    # what makes a resumed run read the data an uninterrupted one reads, without re-reading epochs
    from downpour.training.input import InputSpec, ReadOptions, iter_epoch_blocks, open_prepared

    write_prepared(str(tmp_path), {"train": 1000, "val": 100, "test": 100}, row_group_rows=100, files=1)
    prepared = open_prepared(str(tmp_path))
    spec, url = InputSpec.from_feature_state(prepared.feature_state), prepared.split("train").url
    steps = 7  # 7 x 64 rows per epoch on each of 2 ranks: not a whole pass, and passes do not align

    def epochs(first: int, count: int, rank: int) -> list[np.ndarray]:
        opts = ReadOptions(batch_size=64, rank=rank, size=2, num_epochs=None, window_row_groups=2, seed=5,
                           keep_negatives=0.5, reader_workers=1, drop_remainder=True, epoch_steps=steps,
                           first_epoch=first, block_rows=64 * 3)
        stream = iter_epoch_blocks(url, spec, opts)
        batches: list[np.ndarray] = []
        while len(batches) < steps * count:
            batches += list(next(stream)["n__x0"])  # a block: [m, 64]
        stream.close()
        return np.split(np.stack(batches[:steps * count]), count)

    for rank in (0, 1):
        run = epochs(0, 3, rank)
        assert not np.array_equal(run[1], run[2])  # every epoch is a new draw
        resumed = epochs(2, 1, rank)
        assert np.array_equal(resumed[0], run[2])


def _checkpoint(path: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(path, "ckpt"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in k}


@pytest.mark.slow
def test_resumed_two_worker_run_ends_with_the_weights_of_an_uninterrupted_run(spark, tmp_path, monkeypatch):
    from downpour.training.checkpoints import LATEST
    from downpour.training.train import run_training

    out = str(tmp_path)
    # uneven shards: 5 train row groups (3 + 2 per rank), 3 val row groups (2 + 1)
    write_prepared(out, {"train": 2000, "val": 1200, "test": 400}, row_group_rows=400,
                   files={"train": 1, "val": 1, "test": 1})
    cfg = _config(out, epochs=3, deterministic=True, seed=11, dropout=0.1, warmup_steps=5,
                  early_stopping_patience=0)
    ckpts = os.path.join(out, "training", "checkpoints")

    # Horovod's settings in the driver's environment reach the ranks: rank 0 records its timeline
    timeline = tmp_path / "timeline.json"
    monkeypatch.setenv("HOROVOD_TIMELINE", str(timeline))
    whole = run_training(spark, cfg, fresh=True)["training"]  # never interrupted
    monkeypatch.delenv("HOROVOD_TIMELINE")
    assert '"name": "ALLREDUCE"' in timeline.read_text()
    expected = _checkpoint(os.path.join(ckpts, "epoch-000003"))  # model + optimizer after 3 epochs
    final = whole["final_metrics"]
    scores, labels = _val_scores(out)

    # Interrupt it during epoch 3: what the directory holds when a run dies after committing epoch 2
    # (epoch 2's checkpoint, still kept, and latest.json naming it); a re-run resumes from there.
    with open(os.path.join(ckpts, LATEST)) as f:
        state = json.load(f)
    with open(os.path.join(ckpts, LATEST), "w") as f:
        json.dump({**state, "epoch": 2, "path": "epoch-000002", "history": state["history"][:2],
                   "best": None, "best_path": None, "stopped_early": False}, f)
    # and the resumed run averages each gradient with its own allreduce (Horovod's default) where the
    # uninterrupted one grouped them all (the default, one allreduce a step): the same average
    assert whole["allreduce_groups"] == 1
    per_gradient = cfg.model_copy(update={"training": cfg.training.model_copy(update={"allreduce_groups": 0})})
    resumed = run_training(spark, per_gradient)["training"]
    assert resumed["allreduce_groups"] == 0
    assert resumed["initial_epoch"] == 2 and resumed["epochs_completed"] == 3
    got = _checkpoint(os.path.join(ckpts, "epoch-000003"))

    # the resumed run ends where the uninterrupted one did: every weight and every optimizer slot
    assert sorted(got) == sorted(expected)
    worst = max(float(np.max(np.abs(got[k].astype(np.float64) - expected[k]))) for k in expected)
    assert worst <= 1e-5, f"the resumed run differs from the uninterrupted one by up to {worst:g}"
    # (observed: bit-identical, the same weights SHA-256 as the uninterrupted run)
    assert resumed["rank_weights_sha256"] == whole["rank_weights_sha256"]

    # 9, end to end: the logged val_auc of the last epoch is the AUC over both ranks' rows (the
    # exported model holds the last epoch's weights), which is not the mean of the ranks' own AUCs
    pooled = _keras_auc(labels, scores)
    per_rank = [_keras_auc(labels[rows], scores[rows]) for rows in _val_rows_by_rank(out, 2)]
    assert abs(np.mean(per_rank) - pooled) > 1e-3
    assert final["val_auc"] == pytest.approx(pooled, abs=1e-4)


def _keras_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    import tensorflow as tf

    auc = tf.keras.metrics.AUC()  # what training computes (200 thresholds)
    auc.update_state(labels, scores)
    return float(auc.result())


def _val_rows_by_rank(out: str, size: int) -> list[np.ndarray]:
    """Row indices of the val file that each rank reads (petastorm: row group i goes to rank i % size)."""
    import pyarrow.parquet as pq

    (path,) = glob.glob(os.path.join(out, "prepared", "val", "*.parquet"))
    sizes = [pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(pq.ParquetFile(path).num_row_groups)]
    starts = np.cumsum([0, *sizes])
    return [np.concatenate([np.arange(starts[g], starts[g + 1]) for g in range(len(sizes)) if g % size == r])
            for r in range(size)]


def _val_scores(out: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq
    import tensorflow as tf

    fn = tf.saved_model.load(os.path.join(out, "model", "saved_model")).signatures["serve_features"]
    table = pq.read_table(glob.glob(os.path.join(out, "prepared", "val", "*.parquet"))).to_pandas()
    _, specs = fn.structured_input_signature
    feeds = {k: tf.constant(table[k].to_numpy(v.dtype.as_numpy_dtype)) for k, v in specs.items()}
    return fn(**feeds)["score"].numpy(), table["label"].to_numpy()
