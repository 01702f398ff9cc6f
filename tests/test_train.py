"""`downpour train` end to end: real Horovod (gloo) ranks launched by horovod.spark.run on the shared
local[2] session, over tiny model-ready shards written in the documented format."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from downpour.config import Config
from training.checkpoints import LATEST
from training.synthetic import write_prepared
from training.train import FAIL_ENV, TrainingFailed, run_training

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

# train: 5 row groups for 2 ranks (3 + 2: deliberately uneven); val: 3 row groups
ROWS = {"train": 2000, "val": 1200, "test": 800}
FILES = {"train": 1, "val": 1, "test": 1}


def _config(out: str, **training) -> Config:
    return Config.model_validate({
        "name": "train_test",
        "input": {"path": "/unused"},
        "schema": {"x0": "double", "x1": "double", "x2": "double", "x3": "double", "k0": "string",
                   "k1": "string", "y": "int"},
        "label": {"column": "y"},
        "features": {"numeric": ["x0", "x1", "x2", "x3"], "categorical": ["k0", "k1"]},
        "output": {"path": out},
        "training": {"workers": 2, "epochs": 2, "batch_size": 64, "learning_rate": 0.01, "hidden_units": [8],
                     "dropout": 0.0, "early_stopping_metric": "val_auc", "timeout_s": 420, **training},
    })


def _prepared(root: str, positive_rate: float = 0.2) -> dict:
    return write_prepared(root, ROWS, row_group_rows=400, files=FILES, positive_rate=positive_rate)


def _scores(model_dir: str, split_dir: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq
    import tensorflow as tf

    fn = tf.saved_model.load(os.path.join(model_dir, "saved_model")).signatures["serve_features"]
    table = pq.read_table(split_dir).to_pandas()
    _, specs = fn.structured_input_signature
    feeds = {k: tf.constant(table[k].to_numpy(v.dtype.as_numpy_dtype)) for k, v in specs.items()}
    return fn(**feeds)["score"].numpy(), table["label"].to_numpy()


def test_two_workers_on_uneven_shards_survive_a_kill_resume_agree_learn_and_export(spark, tmp_path, monkeypatch):
    # One scenario, two launches (the suite's time budget): a 2-worker run over 5 train row groups
    # (3 + 2 per rank) is killed after epoch 1, then resumed to the end and exported.
    out = str(tmp_path)
    manifest = _prepared(out)
    assert manifest["splits"]["train"]["row_groups"] == 5
    cfg = _config(out, epochs=3, early_stopping_patience=0)

    monkeypatch.setenv(FAIL_ENV, "1")  # rank 0 raises right after epoch 1 was checkpointed
    with pytest.raises(TrainingFailed, match="worker 0.*injected failure after epoch 1"):
        run_training(spark, cfg, fresh=True)
    latest = json.loads(open(os.path.join(out, "training", "checkpoints", LATEST)).read())
    assert latest["epoch"] == 1
    assert not os.path.exists(os.path.join(out, "model"))  # nothing half-published

    monkeypatch.delenv(FAIL_ENV)
    card = run_training(spark, cfg)  # uneven shards: a hang would hit training.timeout_s and fail
    t = card["training"]
    assert t["workers"] == 2 and t["devices_per_worker"] == 1
    assert t["initial_epoch"] == 1 and t["epochs_completed"] == 3  # resumed, not restarted
    # the optimizer state (its step counter included) came back from the checkpoint
    assert t["optimizer_iterations"] == 3 * t["steps_per_epoch"]
    sums = t["rank_weights_sha256"]
    assert len(sums) == 2 and sums[0] == sums[1]  # every rank ends with identical weights
    history = json.loads(open(os.path.join(out, "model", "history.json")).read())
    losses = [h["loss"] for h in history["epochs"]]
    assert [h["epoch"] for h in history["epochs"]] == [1, 2, 3] and history["initial_epoch"] == 1
    assert losses[2] < losses[0]  # it learns, across the interruption
    assert sum(t["placement"].values()) > 0

    model = os.path.join(out, "model")
    assert os.path.islink(model)  # published by an atomic symlink swap
    saved = json.loads(open(os.path.join(model, "model_card.json")).read())
    assert saved["model_version"] == card["model_version"] and saved["data_version"] == manifest["data_version"]
    assert set(card["signatures"]) == {"serve_features", "serving_default"}
    scores, label = _scores(model, os.path.join(out, "prepared", "test"))
    assert scores.shape == label.shape and np.all((scores > 0) & (scores < 1))
    assert np.mean(scores[label == 1]) > np.mean(scores[label == 0])
    assert os.listdir(os.path.join(model, "tensorboard"))


def test_one_worker_with_a_fixed_seed_is_reproducible_and_calibrated(spark, tmp_path):
    # rare positives, negatives downsampled to a third: the exported score must be corrected back
    out = str(tmp_path)
    manifest = _prepared(out, positive_rate=0.05)
    cfg = _config(out, workers=1, epochs=2, deterministic=True, seed=7, imbalance="downsample",
                  downsample_negatives=0.3)
    first = run_training(spark, cfg, fresh=True)
    second = run_training(spark, cfg, fresh=True)
    assert first["training"]["rank_weights_sha256"] == second["training"]["rank_weights_sha256"]
    assert first["training"]["imbalance"]["logit_shift"] == pytest.approx(np.log(0.3))

    scores, label = _scores(os.path.join(out, "model"), os.path.join(out, "prepared", "test"))
    base = manifest["splits"]["train"]["positives"] / manifest["splits"]["train"]["rows"]
    # uncorrected, the mean would sit near the resampled rate (~3x the base rate)
    assert abs(scores.mean() - base) < 0.5 * base
