"""`downpour train` end to end: real Horovod (gloo) ranks launched by horovod.spark.run on the shared
local[2] session, over tiny model-ready shards written in the documented format."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from benchmarks.synthetic import write_prepared
from downpour.config import Config
from downpour.errors import ConfigError
from downpour.training.checkpoints import LATEST
from downpour.training.plan import KILL_ENV, _kill_worker
from downpour.training.train import TrainingFailed, _worker_error, run_training

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


def _rank_pids() -> set[int]:
    """Live Horovod rank processes (and their launching shells) below this test process."""
    parent, cmd = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd[int(pid)] = f.read()
        except OSError:
            continue
        if stat[0] != "Z":
            parent[int(pid)] = int(stat[1])
    ours = {os.getpid()}
    for _ in range(12):  # pytest -> java -> pyspark.daemon -> task -> middleman -> shell -> rank
        ours |= {p for p, pp in parent.items() if pp in ours}
    return {p for p in ours if b"horovod.spark.task.gloo_exec_fn" in cmd.get(p, b"")}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_two_workers_on_uneven_shards_survive_a_kill_resume_agree_learn_and_export(spark, tmp_path, monkeypatch):
    # One scenario, two launches (the suite's time budget): a 2-worker run over 5 train row groups
    # (3 + 2 per rank) loses rank 1 to SIGKILL in the middle of epoch 2, then is resumed to the end
    # and exported.
    out = str(tmp_path)
    manifest = _prepared(out)
    assert manifest["splits"]["train"]["row_groups"] == 5
    cfg = _config(out, epochs=3, early_stopping_patience=0)

    seen: set[int] = set()  # every rank process of the failing launch, to prove none outlives it
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.3):
            seen.update(_rank_pids())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    monkeypatch.setenv(KILL_ENV, "1:2:3")  # rank 1 SIGKILLs itself after 3 steps of epoch 2
    try:
        # one line naming the lost rank (how it died is in the unit test below: the exit code
        # Horovod reports is that of the first rank to end, normally the dead one)
        with pytest.raises(TrainingFailed, match=r"^training failed: worker 1 was lost \([^\n]*resumes from the last"):
            run_training(spark, cfg, fresh=True)
    finally:
        stop.set()
        watcher.join()
    assert len(seen) >= 2  # the watch did see the ranks (a shell and a Python per rank)
    deadline = time.monotonic() + 30  # the kernel reaps asynchronously; the bound is not a timing claim
    while any(_alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in seen if _alive(p)] and not _rank_pids()  # no surviving rank, no orphan
    latest = json.loads(open(os.path.join(out, "training", "checkpoints", LATEST)).read())
    assert latest["epoch"] == 1  # epoch 2 was in flight: never checkpointed
    assert not os.path.exists(os.path.join(out, "model"))  # nothing half-published

    monkeypatch.delenv(KILL_ENV)
    card = run_training(spark, cfg)  # uneven shards: a hang would hit training.timeout_s and fail
    t = card["training"]
    assert t["workers"] == 2 and t["devices_per_worker"] == 1
    assert t["initial_epoch"] == 1 and t["epochs_completed"] == 3  # resumed, not restarted
    # the optimizer state (its step counter included) came back from the checkpoint: the 3 steps
    # of the lost epoch 2 were redone, not counted twice
    assert t["optimizer_iterations"] == 3 * t["steps_per_epoch"]
    sums = t["rank_weights_sha256"]
    assert len(sums) == 2 and sums[0] == sums[1]  # every rank ends with identical weights
    history = json.loads(open(os.path.join(out, "model", "history.json")).read())
    losses = [h["loss"] for h in history["epochs"]]
    assert [h["epoch"] for h in history["epochs"]] == [1, 2, 3] and history["initial_epoch"] == 1
    assert history["epochs"][0] == latest["history"][0]  # epoch 1 kept from the checkpoint; only 2-3 trained
    assert losses[2] < losses[0]  # it learns, across the interruption
    assert sum(t["placement"].values()) > 0

    model = os.path.join(out, "model")
    assert os.path.islink(model)  # published by an atomic symlink swap
    saved = json.loads(open(os.path.join(model, "model_card.json")).read())
    assert saved["model_version"] == card["model_version"] and saved["data_version"] == manifest["data_version"]
    assert set(card["signatures"]) == {"serve_features", "serving_default", "explain"}
    explain = card["explain"]  # reason codes: named features, a baseline fitted on train rows
    assert len(explain["features"]) > 0 and 0 <= explain["check_gap_16_steps"] < 0.05
    assert 0 < explain["baseline_score"] < 1 and explain["baseline_rows"] > 0
    scores, label = _scores(model, os.path.join(out, "prepared", "test"))
    assert scores.shape == label.shape and np.all((scores > 0) & (scores < 1))
    assert np.mean(scores[label == 1]) > np.mean(scores[label == 0])
    assert os.listdir(os.path.join(model, "tensorboard"))


def test_one_worker_with_a_fixed_seed_is_reproducible_and_calibrated(spark, tmp_path):
    # rare positives, negatives downsampled to a third: the exported score must be corrected back
    out = str(tmp_path)
    manifest = _prepared(out, positive_rate=0.05)
    cfg = _config(out, workers=1, epochs=2, deterministic=True, seed=7, imbalance="downsample",
                  downsample_negatives=0.3, learning_rate_schedule="constant")  # 2 short epochs: no decay
    first = run_training(spark, cfg, fresh=True)
    second = run_training(spark, cfg, fresh=True)
    assert first["training"]["rank_weights_sha256"] == second["training"]["rank_weights_sha256"]
    assert first["training"]["imbalance"]["logit_shift"] == pytest.approx(np.log(0.3))

    scores, label = _scores(os.path.join(out, "model"), os.path.join(out, "prepared", "test"))
    base = manifest["splits"]["train"]["positives"] / manifest["splits"]["train"]["rows"]
    # uncorrected, the mean would sit near the resampled rate (~3x the base rate)
    assert abs(scores.mean() - base) < 0.5 * base


@pytest.mark.parametrize("text, problem", [
    ("1-2-3", "expected rank:epoch:batch"), ("2:1:1", "rank 2 does not exist"),
    ("0:4:1", "epoch 4 is not in 1..3"), ("0:1:0", "batch 0 is not in 1..16"),
])
def test_worker_kill_drill_refuses_a_kill_that_could_never_happen(monkeypatch, text, problem):
    monkeypatch.setenv(KILL_ENV, text)
    with pytest.raises(ConfigError, match=f"{KILL_ENV}: {problem}"):
        _kill_worker(workers=2, epochs=3, steps=16)
    monkeypatch.setenv(KILL_ENV, " 1:3:16 ")
    assert _kill_worker(workers=2, epochs=3, steps=16) == {"rank": 1, "epoch": 3, "batch": 16}


def test_failure_message_prefers_a_ranks_own_error_then_names_the_lost_rank():
    hvd = RuntimeError("Horovod detected that one or more processes exited with non-zero status, thus causing "
                       "the job to be terminated. The first process to do so was:\nProcess name: 1\nExit code: 137\n")
    peer = (0, "HorovodInternalError", "Horovod has been shut down")
    lost = str(_worker_error(hvd, [peer], workers=2))
    assert lost.startswith("training failed: worker 1 was lost (its process was killed by SIGKILL")
    assert "\n" not in lost
    # a rank that reported its own error is the cause, whatever died after it
    own = _worker_error(hvd, [peer, (1, "RuntimeError", "injected failure after epoch 1")], workers=2)
    assert str(own) == "training failed on worker 1: RuntimeError: injected failure after epoch 1"
    # no exit code known (a Spark task gone): the rank that never reported is the lost one
    assert "worker 1 was lost" in str(_worker_error(RuntimeError("Spark job failed"), [peer], workers=2))
