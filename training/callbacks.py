"""Keras callbacks of a training rank: pooled metrics, resumable early stopping, per-epoch checkpoints.

Imported only inside Horovod worker processes (it imports TensorFlow). The order in ``fit`` matters:
``PooledMetrics`` runs first, so every rank's early-stopping decision, and the history and
checkpoints rank 0 writes, see the same numbers, computed over every rank's rows at once (AUC and
loss from the ranks' summed metric state, not a mean of per-rank values); early stopping then sets
``stop_training`` identically on every rank, so no rank is left waiting in an allreduce.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from downpour.training.budget import Budget, learning_rate_at
from downpour.training.checkpoints import CheckpointStore

_TINY = float(np.finfo(np.float32).tiny)  # 1.2e-38, sigmoid(-87)
_ULP = float(np.finfo(np.float32).epsneg)  # 1 - _ULP is the largest float32 below 1


class StepLearningRate(tf.keras.callbacks.Callback):
    """Sets the learning rate of every step from the global step (``budget.learning_rate_at``).

    The step is read from the optimizer, whose iteration count is checkpointed and broadcast, so a
    resumed run continues the schedule where the interrupted one stopped. Replaces Horovod's
    epoch-based warm-up callback, which knew nothing of the budget's end.
    """

    def __init__(self, budget: Budget, base: float, workers: int) -> None:
        super().__init__()
        self.budget, self.base, self.workers = budget, float(base), int(workers)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        tf.keras.backend.set_value(self.model.optimizer.lr, learning_rate_at(step, self.budget, self.base,
                                                                             self.workers))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["lr"] = float(tf.keras.backend.get_value(self.model.optimizer.lr))


class SpreadAUC(tf.keras.metrics.AUC):
    """ROC/PR AUC over ``sigmoid(logit(p) / 32)`` instead of ``p``.

    Why: Keras' AUC counts examples between evenly spaced thresholds on [0, 1]. With rare positives
    nearly every negative scores below the first threshold, so the count ties them with the few
    positives scored low and the AUC reads 0.985 where the exact one is 0.999 (early stopping and the
    best round follow it). AUC depends only on the order of the scores, and this monotone map spreads
    every logit a float32 probability can hold, [-87.3, 16.6], over [0.06, 0.63]: 5,000 thresholds
    resolve about 0.027 of a logit over [-16, 17], 0.03 near -30 (a confident negative of a fraud
    model) and 0.09 near -80. ``p`` is clipped only at float32's smallest normal number: a clip at 1e-7
    tied every logit below -16.
    """

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        p = tf.clip_by_value(tf.cast(y_pred, tf.float32), _TINY, 1 - _ULP)
        spread = tf.sigmoid((tf.math.log(p) - tf.math.log1p(-p)) / 32.0)
        return super().update_state(y_true, spread, sample_weight)


def monitor_mode(metric: str) -> str:
    return "min" if metric.endswith("loss") else "max"


# Metrics whose state is a sum over examples: AUC's per-threshold confusion counts, Mean's total and
# count (the loss). Summing that state over ranks gives the state of one metric fed every rank's rows.
_ADDITIVE = (tf.keras.metrics.AUC, tf.keras.metrics.Mean)


def additive_metrics(model: tf.keras.Model) -> dict[str, tf.keras.metrics.Metric]:
    """The model's compiled metrics that can be pooled across ranks, by name (the train log key)."""
    return {m.name: m for m in model.metrics if isinstance(m, _ADDITIVE)}


def pooled_results(metrics: Mapping[str, tf.keras.metrics.Metric],
                   sum_across_ranks: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """Each metric's result over the union of every rank's examples.

    Why: the mean of per-rank AUCs is not the AUC of the pooled rows (ranks hold different numbers
    and mixes of rows), and early stopping and the best epoch must rank epochs by the real one. Every
    rank calls this at the same point: the metrics' state variables go through one collective sum
    (float64, so counts stay exact), are loaded back, and each metric's own ``result()`` is computed
    from the sums. The metrics' local state is overwritten (Keras resets it before its next use).
    """
    names = sorted(metrics)
    variables = [v for n in names for v in metrics[n].variables]
    if not variables:
        return {}
    flat = np.concatenate([np.ravel(v.numpy()).astype(np.float64) for v in variables])
    total = np.asarray(sum_across_ranks(flat), dtype=np.float64)
    i = 0
    for v in variables:
        n = int(np.prod(v.shape))
        v.assign(total[i:i + n].reshape(v.shape).astype(v.dtype.as_numpy_dtype))
        i += n
    return {n: float(metrics[n].result()) for n in names}


def _horovod_sum(values: np.ndarray) -> np.ndarray:
    import horovod.tensorflow as hvd

    return hvd.allreduce(tf.constant(values), op=hvd.Sum, name="downpour_pooled_metrics").numpy()


def _horovod_mean(name: str, value: Any) -> Any:
    import horovod.tensorflow as hvd

    return hvd.allreduce(tf.constant(value), op=hvd.Average, name=f"downpour_mean_{name}").numpy()


class PooledMetrics(tf.keras.callbacks.Callback):
    """Replace every rank's epoch logs with numbers over all ranks' rows (replaces Horovod's
    ``MetricAverageCallback``, which averages per-rank values).

    AUC, PR-AUC and loss (train and ``val_``) are pooled: computed from the ranks' summed metric
    state (``pooled_results``). The train state is taken at the epoch's last step, before Keras'
    validation resets it; the validation state at the epoch's end. Any other log value is averaged.
    Every rank takes the same steps and sees the same log keys, so the collectives line up.
    """

    def __init__(self, sum_across_ranks: Callable[[np.ndarray], np.ndarray] = _horovod_sum,
                 mean_across_ranks: Callable[[str, Any], Any] = _horovod_mean) -> None:
        super().__init__()
        self.sum_across_ranks = sum_across_ranks
        self.mean_across_ranks = mean_across_ranks
        self._train: dict[str, float] = {}

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._train = {}

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if batch + 1 == self.params.get("steps"):
            self._train = pooled_results(additive_metrics(self.model), self.sum_across_ranks)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            return
        metrics = additive_metrics(self.model)
        pooled = {k: v for k, v in self._train.items() if k in logs}
        if any(f"val_{n}" in logs for n in metrics):
            pooled.update({f"val_{n}": v for n, v in pooled_results(metrics, self.sum_across_ranks).items()
                           if f"val_{n}" in logs})
        for key in sorted(logs):
            logs[key] = pooled[key] if key in pooled else self.mean_across_ranks(key, logs[key])


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


class EpochSeededDropout(tf.keras.callbacks.Callback):
    """At every epoch start, reseed each random layer's generator (dropout) from (seed, rank, epoch).

    Why: the dropout RNG state is in no checkpoint, so a resumed run would draw other masks than an
    uninterrupted one from the resume on (and its weights would drift apart). Reseeded per epoch,
    epoch ``e``'s masks are the same whether the run started at 0 or resumed at ``e``, and differ
    between ranks. Needs Keras' ``tf.random.Generator`` RNG
    (``tf.keras.backend.experimental.enable_tf_random_generator()`` before the model is built).
    """

    def __init__(self, seed: int, rank: int) -> None:
        super().__init__()
        self.seed, self.rank = seed, rank

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for i, gen in enumerate(random_generators(self.model)):
            gen.reset_from_seed(_seed_of(self.seed, self.rank, epoch, i))


def random_generators(model: tf.keras.Model) -> list[tf.random.Generator]:
    """The ``tf.random.Generator`` of every random layer (Dropout, ...) of ``model``, in a fixed order."""
    out = []
    for layer in model.submodules:
        rng = getattr(layer, "_random_generator", None)
        if rng is None or not hasattr(rng, "_maybe_init"):
            continue
        rng._maybe_init()
        gen = getattr(rng, "_generator", None)
        if gen is None:
            raise RuntimeError(f"layer {layer.name}: its RNG is not a tf.random.Generator; call "
                               "tf.keras.backend.experimental.enable_tf_random_generator() before building")
        out.append(gen)
    return out


def _seed_of(*parts: int) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


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
