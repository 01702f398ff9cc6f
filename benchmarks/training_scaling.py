"""Horovod data-parallel scaling (2 workers against 1) and training memory on 1x against 10x rows.

* ``horovod_2v1_speedup``: training examples/s (all ranks together, the last epoch's, so graph
  tracing in epoch 1 is left out) with 2 Horovod workers over 1, same per-worker batch (weak scaling:
  what the Horovod paper's 90% efficiency refers to), alternated ``repeats`` times on the same
  prepared fraud shards with ``training.imbalance=none`` (every train row is read and trained on);
  ``horovod_2v1_speedup_same_global_batch`` is the same with 2 workers at half the per-worker batch.
* ``train_peak_rss_10x_ratio``: peak RSS of the Python processes under the driver (the Horovod
  ranks and Spark's Python workers) training one epoch with the shipped ``conf/fraud.yaml`` on shards
  prepared from 10x the rows, over the same on 1x: the input pipeline streams row groups, so this
  should stay near 1.
"""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks.common import fraud_config, median


def train(spark: Any, raw: str, out: str, *overrides: str) -> dict[str, Any]:
    from downpour.training.train import run_training

    return run_training(spark, fraud_config(raw, out, "evaluation.baseline=false", *overrides), fresh=True)


def _last_epoch_speed(out: str) -> float:
    with open(os.path.join(out, "model", "history.json")) as f:
        return float(json.load(f)["epochs"][-1]["examples_per_s"])


def measure_scaling(spark: Any, raw: str, out: str, repeats: int = 2, epochs: int = 2) -> dict[str, Any]:
    """Examples/s with 1 and 2 workers, alternating (``out`` holds a published ``prepared/``)."""
    from downpour.logs import LOG

    batch = fraud_config(raw, out).training.batch_size
    # (workers, per-worker batch): 1 worker; 2 workers at the same per-worker batch (weak scaling);
    # 2 workers at half of it (the same global batch, so the same optimisation steps per epoch)
    runs = {"1": (1, batch), "2": (2, batch), "2_same_global_batch": (2, max(1, batch // 2))}
    speeds: dict[str, list[float]] = {k: [] for k in runs}
    card: dict[str, Any] = {}
    for i in range(repeats):
        for name, (workers, per_worker) in runs.items():
            card = train(spark, raw, out, f"training.workers={workers}", f"training.epochs={epochs}",
                          f"training.batch_size={per_worker}", "training.imbalance=none",
                          "training.early_stopping_patience=0")
            speeds[name].append(_last_epoch_speed(out))
            LOG.info("bench training %s round %d/%d: %.0f examples/s", name, i + 1, repeats, speeds[name][-1])
    s1, s2, s2g = median(speeds["1"]), median(speeds["2"]), median(speeds["2_same_global_batch"])
    t = card.get("training", {})
    return {
        "epochs": epochs,
        "repeats": repeats,
        "batch_size_per_worker": batch,
        "threads_per_worker_2_workers": t.get("threads_per_worker"),
        "examples_per_s_1_worker": round(s1),
        "examples_per_s_2_workers": round(s2),
        "examples_per_s_2_workers_same_global_batch": round(s2g),
        "horovod_2v1_speedup": round(s2 / s1, 2),
        "horovod_2v1_speedup_same_global_batch": round(s2g / s1, 2),
        "samples_examples_per_s": {k: [round(x) for x in v] for k, v in speeds.items()},
    }


def measure_memory(spark: Any, raw_small: str, out_small: str, raw_big: str, out_big: str) -> dict[str, Any]:
    """Peak Python-process RSS training one epoch (shipped config) on 1x and on 10x prepared rows."""
    from benchmarks.procmem import PeakRSS

    peaks = {}
    for name, raw, out in (("1x", raw_small, out_small), ("10x", raw_big, out_big)):
        with PeakRSS() as mem:
            train(spark, raw, out, "training.epochs=1", "training.workers=1")
        peaks[name] = mem.summary()
    return {
        "train_peak_rss_mb_1x": peaks["1x"]["peak_worker_mb"],
        "train_peak_rss_mb_10x": peaks["10x"]["peak_worker_mb"],
        "train_peak_rss_10x_ratio": round(peaks["10x"]["peak_worker_mb"] / peaks["1x"]["peak_worker_mb"], 3),
        "train_driver_rss_mb": {k: v["driver_mb"] for k, v in peaks.items()},
        "train_peak_by_kind_mb": {k: v["peak_by_kind_mb"] for k, v in peaks.items()},
    }
