"""Batch scoring throughput and the peak memory of its Python workers.

``downpour score`` on raw fraud rows (the whole path a user runs: ingest and cleaning rules, window
features, the exported model's ``serving_default`` in ``mapInPandas``, Parquet out). Reported, not
compared: rows/s over the wall time of the stage, and the peak RSS of any Python process under the
driver (Spark's Python workers, where the SavedModel runs), sampled from ``/proc``.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from benchmarks.common import fraud_config


def measure(spark: Any, raw: str, model_out: str, workdir: str) -> dict[str, Any]:
    """Score ``raw`` with the model published under ``model_out``/model."""
    from downpour.procmem import PeakRSS
    from pipelines.score import run_scoring

    scores = os.path.join(workdir, "scores")
    shutil.rmtree(scores, ignore_errors=True)
    shutil.rmtree(scores + "_quarantine", ignore_errors=True)
    cfg = fraud_config(raw, model_out)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        counts = run_scoring(spark, cfg, input_url=raw, output_url=scores)
        seconds = time.perf_counter() - t0
    shutil.rmtree(scores, ignore_errors=True)
    shutil.rmtree(scores + "_quarantine", ignore_errors=True)
    summary = mem.summary()
    return {
        "scoring_rows": counts["input"],
        "scoring_scored": counts["scored"],
        "scoring_seconds": round(seconds, 2),
        "scoring_rows_per_s": round(counts["input"] / seconds),
        "scoring_peak_rss_mb": summary["peak_worker_mb"],
        "scoring_driver_rss_mb": summary["driver_mb"],
        "scoring_python_workers": summary["workers_seen"],
    }
