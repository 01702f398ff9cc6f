"""What every benchmark shares: one SparkSession, cached raw data, alternating timed runs, medians.

The machine these run on may be shared and noisy, so no figure is an absolute time: each is a ratio
of two things measured side by side in one run, alternating (A, B, A, B, ...) so background load
falls on both, and summarised by the median over repeats.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from downpour.logs import LOG

FRAUD_CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "fraud.yaml")


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each function, run in alternation ``repeats`` times."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
            LOG.info("bench %s round %d/%d: %.1f s", name, i + 1, repeats, samples[name][-1])
    return samples


def bare_io(spark: Any, raw: str, out: str) -> None:
    """The floor every Spark stage is compared with: read the raw CSV (text columns), write Parquet."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    spark.read.option("header", True).csv(raw).write.mode("overwrite").parquet(out)


def spread(xs: list[float]) -> list[float]:
    """(min, max) of the samples, rounded: how much a median could move."""
    return [round(min(xs), 2), round(max(xs), 2)]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """``a[i] / b[i]`` for each round ``i``: the two contenders of one round ran back to back."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratios: {len(a)} and {len(b)} samples")
    return [x / y for x, y in zip(a, b, strict=True)]


def ratio_figure(a: list[float], b: list[float], digits: int = 2) -> tuple[float, list[float]]:
    """A figure and its spread: the median of the per-round ratios ``a[i] / b[i]`` and their (min, max)."""
    r = paired_ratios(a, b)
    return round(median(r), digits), [round(min(r), digits), round(max(r), digits)]


def summary(xs: list[float], digits: int = 2) -> dict[str, Any]:
    """Median, (min, max) and every sample of one contender (whole numbers with ``digits=0``)."""
    def r(x: float) -> float:
        return round(x) if digits <= 0 else round(x, digits)

    return {"median": r(median(xs)), "spread": [r(min(xs)), r(max(xs))], "samples": [r(x) for x in xs]}


def raw_fraud(spark: Any, workdir: str, rows: int, seed: int = 42) -> str:
    """Synthetic raw fraud CSV of ``rows`` rows under ``workdir`` (generated once, then reused)."""
    from downpour import api

    out = os.path.join(workdir, "raw", f"fraud-{rows}-seed{seed}")
    done = os.path.join(out, "_BENCH_DONE")
    if not os.path.exists(done):
        api.generate("fraud", rows=rows, out=out, seed=seed, spark=spark)
        open(done, "w").close()
    return out


def fraud_config(raw: str, out: str, *overrides: str) -> Any:
    """conf/fraud.yaml pointed at ``raw`` and ``out``, with ``--set``-style overrides."""
    from downpour import api

    return api.load(FRAUD_CONF, [f"input.path={raw}", f"output.path={out}", *overrides])
