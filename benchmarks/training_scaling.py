"""Horovod data-parallel scaling (2 workers against 1) and training memory on 1x against 10x rows.

* ``horovod_2v1_speedup``: training examples/s (all ranks together, the last epoch's, so graph
  tracing in epoch 1 is left out) with 2 Horovod workers over 1, same per-worker batch (weak scaling:
  what the Horovod paper's 90% efficiency refers to), alternated ``repeats`` times on the same
  prepared fraud shards with ``training.imbalance=none`` (every train row is read and trained on).
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


def _train(spark: Any, raw: str, out: str, *overrides: str) -> dict[str, Any]:
    from training.train import run_training

    return run_training(spark, fraud_config(raw, out, "evaluation.baseline=false", *overrides), fresh=True)


def _last_epoch_speed(out: str) -> float:
    with open(os.path.join(out, "model", "history.json")) as f:
        return float(json.load(f)["epochs"][-1]["examples_per_s"])


def measure_scaling(spark: Any, raw: str, out: str, repeats: int = 2, epochs: int = 2) -> dict[str, Any]:
    """Examples/s with 1 and 2 workers, alternating (``out`` holds a published ``prepared/``)."""
    from downpour.logs import LOG

    speeds: dict[int, list[float]] = {1: [], 2: []}
    card: dict[str, Any] = {}
    for i in range(repeats):
        for workers in (1, 2):
            card = _train(spark, raw, out, f"training.workers={workers}", f"training.epochs={epochs}",
                          "training.imbalance=none", "training.early_stopping_patience=0")
            speeds[workers].append(_last_epoch_speed(out))
            LOG.info("bench training workers=%d round %d/%d: %.0f examples/s", workers, i + 1, repeats,
                     speeds[workers][-1])
    s1, s2 = median(speeds[1]), median(speeds[2])
    t = card.get("training", {})
    return {
        "epochs": epochs,
        "repeats": repeats,
        "batch_size_per_worker": t.get("batch_size_per_worker"),
        "steps_per_epoch_2_workers": t.get("steps_per_epoch"),
        "threads_per_worker_2_workers": t.get("threads_per_worker"),
        "examples_per_s_1_worker": round(s1),
        "examples_per_s_2_workers": round(s2),
        "horovod_2v1_speedup": round(s2 / s1, 2),
        "samples_examples_per_s": {str(k): [round(x) for x in v] for k, v in speeds.items()},
    }


def measure_memory(spark: Any, raw_small: str, out_small: str, raw_big: str, out_big: str) -> dict[str, Any]:
    """Peak Python-process RSS training one epoch (shipped config) on 1x and on 10x prepared rows."""
    from downpour.procmem import PeakRSS

    peaks = {}
    for name, raw, out in (("1x", raw_small, out_small), ("10x", raw_big, out_big)):
        with PeakRSS() as mem:
            _train(spark, raw, out, "training.epochs=1", "training.workers=1")
        peaks[name] = mem.summary()
    return {
        "train_peak_rss_mb_1x": peaks["1x"]["peak_worker_mb"],
        "train_peak_rss_mb_10x": peaks["10x"]["peak_worker_mb"],
        "train_peak_rss_10x_ratio": round(peaks["10x"]["peak_worker_mb"] / peaks["1x"]["peak_worker_mb"], 3),
        "train_driver_rss_mb": {k: v["driver_mb"] for k, v in peaks.items()},
        "train_peak_by_kind_mb": {k: v["peak_by_kind_mb"] for k, v in peaks.items()},
    }
