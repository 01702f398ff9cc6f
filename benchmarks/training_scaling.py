"""Horovod data-parallel scaling (2 workers against 1) and training memory on 1x against 10x rows.

``train_vs_in_memory`` (our input pipeline against in-memory tensors) is ``benchmarks/train_in_memory.py``.

* ``horovod_2v1_speedup_fixed_threads``: data parallelism with fixed resources per worker: training
  examples/s (all ranks together) of 2 Horovod workers over 1, each worker with one TensorFlow thread
  (``training.threads_per_worker=1``, which ``training/rank.py`` applies to the intra- and inter-op
  pools and ``OMP_NUM_THREADS``) and one petastorm reader thread (``training.reader_workers=1``), the
  same per-worker batch, the same data and epochs. Not capped: tf.data's own thread pool and Horovod's
  background thread. On a machine with fewer free cores than workers this cannot reach 2.
* ``horovod_grouped_vs_per_gradient``: the 2 fixed-thread workers with every gradient in one grouped
  allreduce a step (``training.allreduce_groups: 1``, the default) over one allreduce per gradient
  (``0``, Horovod's own default).
* ``horovod_2v1_speedup_same_machine`` (was ``horovod_2v1_speedup``): 1 worker with the default threads
  (all cores) against 2 workers with cores/2 each, same per-worker batch: both use the whole machine,
  so on one machine this says nothing about data parallelism (reported, no goal);
  ``horovod_2v1_speedup_same_global_batch`` is the same with 2 workers at half the per-worker batch.

  All six runs alternate ``repeats`` times (the order rotated every round and reversed every other
  round, so each pair runs in both orders) on the same prepared fraud
  shards with ``training.imbalance=none`` (every train row is read and trained on); examples/s is taken
  over every epoch after the first (the first traces the graph: the warm-up, the same for all); each
  figure is the median over rounds of the ratio within the round, with its (min, max).
* ``train_peak_rss_10x_ratio``: peak RSS of the Python processes under the driver (the Horovod
  ranks and Spark's Python workers) training one epoch with the shipped ``conf/fraud.yaml``, ``training.workers=1`` and
  ``training.input_cache_mb=0`` on shards prepared from 10x the rows, over the same on 1x: streaming
  row groups, so this should stay near 1. ``train_peak_rss_10x_ratio_default`` (reported) is the same
  with the shipped budget, under which a worker's share that fits is held in memory: it grows with the
  rows up to ``training.input_cache_mb``, then streams.
"""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks.common import fraud_config


def train(spark: Any, raw: str, out: str, *overrides: str) -> dict[str, Any]:
    from downpour.training.train import run_training

    return run_training(spark, fraud_config(raw, out, "evaluation.baseline=false", *overrides), fresh=True)


def _speed_after_first_epoch(out: str) -> float:
    """Training examples/s (all ranks) over every epoch but the first (which traces the graph)."""
    with open(os.path.join(out, "model", "history.json")) as f:
        epochs = json.load(f)["epochs"]
    timed = epochs[1:] or epochs
    seconds = sum(float(e["train_seconds"]) for e in timed)
    return sum(float(e["examples_per_s"]) * float(e["train_seconds"]) for e in timed) / seconds


# name -> (workers, per-worker batch as a fraction of the config's, extra overrides)
FIXED = ("training.threads_per_worker=1", "training.reader_workers=1")
RUNS: dict[str, tuple[int, float, tuple[str, ...]]] = {
    # one worker with the default threads (all cores) against two with cores/2 each: the same machine
    "1": (1, 1.0, ()),
    "2": (2, 1.0, ()),
    "2_same_global_batch": (2, 0.5, ()),
    # fixed resources per worker: one TensorFlow thread (intra- and inter-op) and one reader thread each
    "1_fixed_threads": (1, 1.0, FIXED),
    "2_fixed_threads": (2, 1.0, FIXED),
    # the same, each gradient averaged on its own (Horovod's default) instead of in one grouped allreduce
    "2_fixed_threads_per_gradient": (2, 1.0, (*FIXED, "training.allreduce_groups=0")),
}


def measure_scaling(spark: Any, raw: str, out: str, repeats: int = 3, epochs: int = 2) -> dict[str, Any]:
    """Examples/s of every run in ``RUNS``, alternated ``repeats`` times (``out`` holds a published
    ``prepared/``); each figure is the median of per-round ratios with their (min, max)."""
    from benchmarks.common import ratio_figure, summary
    from downpour.logs import LOG

    batch = fraud_config(raw, out).training.batch_size
    speeds: dict[str, list[float]] = {k: [] for k in RUNS}
    threads: dict[str, Any] = {}
    names = list(RUNS)
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first ...
        for name in order[::-1] if i % 2 else order:  # ... and reverse every other round: pairs swap
            workers, fraction, extra = RUNS[name]
            card = train(spark, raw, out, f"training.workers={workers}", f"training.epochs={epochs}",
                         f"training.batch_size={max(1, int(batch * fraction))}", "training.imbalance=none",
                         "training.early_stopping_patience=0", *extra)
            threads[name] = card.get("training", {}).get("threads_per_worker")
            speeds[name].append(_speed_after_first_epoch(out))
            LOG.info("bench training %s round %d/%d: %.0f examples/s", name, i + 1, repeats, speeds[name][-1])
    same, same_spread = ratio_figure(speeds["2"], speeds["1"])
    sgb, sgb_spread = ratio_figure(speeds["2_same_global_batch"], speeds["1"])
    fixed, fixed_spread = ratio_figure(speeds["2_fixed_threads"], speeds["1_fixed_threads"])
    grouped, grouped_spread = ratio_figure(speeds["2_fixed_threads"], speeds["2_fixed_threads_per_gradient"])
    per = {k: summary(v, 0) for k, v in speeds.items()}
    return {
        "epochs": epochs,
        "repeats": repeats,
        "batch_size_per_worker": batch,
        "runs": {k: {"workers": w, "batch_size_per_worker": max(1, int(batch * f)), "overrides": list(x),
                     "threads_per_worker": threads.get(k)} for k, (w, f, x) in RUNS.items()},
        "timed": "examples/s of every epoch after the first (which traces the graph and is the warm-up), "
                 "from the run's history.json (validation excluded); every run on the same prepared "
                 "shards, imbalance=none (every train row), the same epochs",
        "examples_per_s": per,
        "examples_per_s_1_worker": per["1"]["median"],
        "examples_per_s_2_workers": per["2"]["median"],
        "examples_per_s_2_workers_same_global_batch": per["2_same_global_batch"]["median"],
        "examples_per_s_1_worker_fixed_threads": per["1_fixed_threads"]["median"],
        "examples_per_s_2_workers_fixed_threads": per["2_fixed_threads"]["median"],
        "horovod_2v1_speedup_same_machine": same,
        "horovod_2v1_speedup_same_machine_spread": same_spread,
        "horovod_2v1_speedup_same_global_batch": sgb,
        "horovod_2v1_speedup_same_global_batch_spread": sgb_spread,
        "horovod_2v1_speedup_fixed_threads": fixed,
        "horovod_2v1_speedup_fixed_threads_spread": fixed_spread,
        "horovod_grouped_vs_per_gradient": grouped,
        "horovod_grouped_vs_per_gradient_spread": grouped_spread,
    }


def measure_memory(spark: Any, raw_small: str, out_small: str, raw_big: str, out_big: str) -> dict[str, Any]:
    """Peak Python-process RSS training one epoch (shipped config) on 1x and on 10x prepared rows."""
    from benchmarks.procmem import PeakRSS

    peaks = {}
    for cache, extra in (("", ("training.input_cache_mb=0",)), ("_default", ())):
        for name, raw, out in (("1x", raw_small, out_small), ("10x", raw_big, out_big)):
            with PeakRSS() as mem:
                train(spark, raw, out, "training.epochs=1", "training.workers=1", *extra)
            peaks[name + cache] = mem.summary()
    figs: dict[str, Any] = {}
    for cache in ("", "_default"):
        one, ten = peaks["1x" + cache]["peak_worker_mb"], peaks["10x" + cache]["peak_worker_mb"]
        figs.update({f"train_peak_rss_mb_1x{cache}": one, f"train_peak_rss_mb_10x{cache}": ten,
                    f"train_peak_rss_10x_ratio{cache}": round(ten / one, 3)})
    return {
        **figs,
        "train_driver_rss_mb": {k: v["driver_mb"] for k, v in peaks.items()},
        "train_peak_by_kind_mb": {k: v["peak_by_kind_mb"] for k, v in peaks.items()},
    }
