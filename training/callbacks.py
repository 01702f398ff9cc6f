"""Keras callbacks of a training rank: resumable early stopping, per-epoch checkpoints and history.

Imported only inside Horovod worker processes (it imports TensorFlow). The order in ``fit`` matters:
Horovod's ``MetricAverageCallback`` runs first, so every rank's early-stopping decision, and the
history and checkpoints rank 0 writes, see the same cross-rank averages; early stopping then sets
``stop_training`` identically on every rank, so no rank is left waiting in an allreduce.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any

import tensorflow as tf

from training.checkpoints import CheckpointStore


def monitor_mode(metric: str) -> str:
    return "min" if metric.endswith("loss") else "max"


class ResumableEarlyStopping(tf.keras.callbacks.EarlyStopping):
    """Keras early stopping whose ``wait``/``best`` survive an interruption (restored from the
    checkpoint state), so a resumed run stops at the epoch an uninterrupted one would have."""

    def __init__(self, monitor: str, patience: int, state: dict[str, Any] | None = None) -> None:
        super().__init__(monitor=monitor, patience=patience, mode=monitor_mode(monitor), verbose=0,
                         restore_best_weights=False)
        self._resume = state or {}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        if self._resume.get("best") is not None:
            self.best = float(self._resume["best"])
            self.wait = int(self._resume.get("wait", 0))
            self.best_epoch = int(self._resume.get("best_epoch", 0))

    def snapshot(self) -> dict[str, Any]:
        best = float(self.best) if self.best is not None and math.isfinite(float(self.best)) else None
        return {"best": best, "wait": int(self.wait), "best_epoch": int(getattr(self, "best_epoch", 0))}


class EpochRecorder(tf.keras.callbacks.Callback):
    """Rank 0: after every epoch, append the averaged logs to the history and write a checkpoint
    (model + optimizer, plus the best weights when the monitored metric improved)."""

    def __init__(self, store: CheckpointStore, state: dict[str, Any], monitor: str,
                 early: ResumableEarlyStopping | None, examples_per_step: int) -> None:
        super().__init__()
        self.store = store
        self.state = dict(state)
        self.state.setdefault("history", [])
        self.monitor = monitor
        self.mode = monitor_mode(monitor)
        self.early = early
        self.examples_per_step = examples_per_step
        self._t0 = self._t_val = 0.0
        self._steps = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._t0, self._t_val, self._steps = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps = batch + 1

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._t0 and not self._t_val:
            self._t_val = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.perf_counter()
        train_s = (self._t_val or now) - self._t0
        row = {"epoch": epoch + 1, **{k: _num(v) for k, v in (logs or {}).items()}}
        row["train_seconds"] = round(train_s, 3)
        row["epoch_seconds"] = round(now - self._t0, 3)
        row["examples_per_s"] = round(self._steps * self.examples_per_step / train_s, 1) if train_s > 0 else None
        history = [h for h in self.state["history"] if h["epoch"] <= epoch] + [row]
        value = row.get(self.monitor)
        best = self.state.get("best")
        improved = value is not None and math.isfinite(value) and (
            best is None or (value < best["value"] if self.mode == "min" else value > best["value"]))
        if improved:
            best = {"epoch": epoch + 1, "metric": self.monitor, "value": value}
        stopped = bool(self.model.stop_training) and self.early is not None and self.early.stopped_epoch > 0
        self.state = self.store.save(self.model, self.model.optimizer, {
            **self.state,
            "epoch": epoch + 1,
            "history": history,
            "best": best,
            "early_stopping": self.early.snapshot() if self.early is not None else None,
            "stopped_early": stopped,
        }, best=improved)


class FailAfterEpoch(tf.keras.callbacks.Callback):
    """Recovery drills and tests: make this rank fail right after epoch ``n`` was checkpointed."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch + 1 == self.n:
            raise RuntimeError(f"injected failure after epoch {self.n} (DOWNPOUR_FAIL_AFTER_EPOCH)")


class KillMidEpoch(tf.keras.callbacks.Callback):
    """Recovery drills and tests: this rank dies by SIGKILL after ``batch`` train steps of epoch
    ``epoch`` (both 1-based), i.e. mid-epoch and before that epoch's checkpoint. Unlike an exception
    this is a real worker loss: no ``finally``, no marked error line, sockets closed by the kernel."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__()
        self.epoch, self.batch = epoch, batch
        self._current = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._current == self.epoch and batch + 1 == self.batch:
            print(f"\nDOWNPOUR_KILL_WORKER: rank {os.environ.get('HOROVOD_RANK', '?')} kills itself (SIGKILL) "
                  f"after batch {self.batch} of epoch {self.epoch}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _num(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None
