"""Batch scoring against bare I/O on the same raw rows, and the peak memory of its Python workers.

``downpour score`` on raw fraud rows (the whole path a user runs: ingest and cleaning rules, window
features over the model's entity history plus the input, the exported model's ``serving_default`` in
``mapInPandas``, Parquet out) alternates with a bare Spark read-CSV/write-Parquet of the same files
and with ``downpour score`` of the 1x raw rows, after one warm-up of each: ``score_vs_bare_io`` is the
median over rounds of score / bare I/O seconds of the same round, ``score_10x_scaling`` the same of
10x-rows / 1x-rows score seconds (normalised to a 10x step; linear is 10), each with (min, max).
Also reported: rows/s of scoring with history, the history rows it joined, and the peak RSS of any
Python process under the driver (Spark's Python workers, where the SavedModel runs), sampled from ``/proc``.

``measure_reasons``: the same ``downpour score`` with and without reason codes
(``scoring.reason_codes``, default steps and top_k), alternated on the same raw rows after one warm-up
of each: ``reason_codes_time_ratio`` and rows/s of both.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from benchmarks.common import alternate, bare_io, fraud_config, median, spread


def measure(spark: Any, raw: str, model_out: str, workdir: str, repeats: int = 3,
            raw_small: str | None = None) -> dict[str, Any]:
    """Score ``raw`` with the model published under ``model_out``/model, beside bare I/O on ``raw``
    (and, given ``raw_small``, beside scoring ``raw_small``: ``score_10x_scaling``)."""
    from benchmarks.common import ratio_figure
    from benchmarks.procmem import PeakRSS
    from downpour.pipelines.score import run_scoring
    from downpour.pipelines.score_outputs import remove_outputs

    scores = os.path.join(workdir, "scores")
    cfg = fraud_config(raw, model_out)
    runs: dict[str, list[dict[str, Any]]] = {"score": [], "score_small": []}

    def scorer(name: str, url: str) -> Any:
        def go() -> None:
            remove_outputs(scores)
            runs[name].append(run_scoring(spark, cfg, input_url=url, output_url=scores))
        return go

    def bare() -> None:
        bare_io(spark, raw, os.path.join(workdir, "scores-bare"))

    fns = {"score": scorer("score", raw), "bare_io": bare}
    if raw_small:
        fns["score_small"] = scorer("score_small", raw_small)
    with PeakRSS() as mem:
        alternate(fns, 1)  # warm-up: the same for all
        s = alternate(fns, repeats)
    remove_outputs(scores)
    shutil.rmtree(os.path.join(workdir, "scores-bare"), ignore_errors=True)
    last, summary = runs["score"][-1], mem.summary()
    history = last.get("history") or {}
    vs_bare, vs_bare_spread = ratio_figure(s["score"], s["bare_io"])
    out = {
        "scoring_rows": last["input"],
        "scoring_scored": last["scored"],
        "scoring_seconds": round(median(s["score"]), 2),
        "scoring_seconds_spread": spread(s["score"]),
        "scoring_bare_io_seconds": round(median(s["bare_io"]), 2),
        "scoring_bare_io_seconds_spread": spread(s["bare_io"]),
        "scoring_repeats": repeats,
        "score_vs_bare_io": vs_bare,
        "score_vs_bare_io_spread": vs_bare_spread,
        "scoring_rows_per_s": round(last["input"] / median(s["score"])),
        "scoring_history_used": bool(history.get("used")),
        "scoring_history_rows": sum(int(x.get("rows") or 0) for x in history.get("sources", [])),
        "scoring_peak_rss_mb": summary["peak_worker_mb"],
        "scoring_driver_rss_mb": summary["driver_mb"],
        "scoring_python_workers": summary["workers_seen"],
    }
    if raw_small:
        small_rows = runs["score_small"][-1]["input"]
        scale = last["input"] / small_rows
        # normalised to a 10x step, like prepare_10x_scaling (linear is 10)
        ratio, ratio_spread = ratio_figure([x * 10 / scale for x in s["score"]], s["score_small"])
        out.update({
            "scoring_small_rows": small_rows,
            "scoring_small_seconds": round(median(s["score_small"]), 2),
            "scoring_small_seconds_spread": spread(s["score_small"]),
            "score_10x_scaling": ratio,
            "score_10x_scaling_spread": ratio_spread,
        })
    return out


def measure_reasons(spark: Any, raw: str, model_out: str, workdir: str, repeats: int = 3) -> dict[str, Any]:
    """``downpour score`` of ``raw`` without and with reason codes, side by side."""
    from benchmarks.common import ratio_figure
    from downpour.pipelines.score import run_scoring
    from downpour.pipelines.score_outputs import remove_outputs

    plain_cfg = fraud_config(raw, model_out)
    reasons_cfg = fraud_config(raw, model_out, "scoring.reason_codes.enabled=true")
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "reasons": []}

    def contender(name: str, cfg: Any) -> Any:
        out = os.path.join(workdir, f"scores-{name}")

        def go() -> None:
            remove_outputs(out)
            runs[name].append(run_scoring(spark, cfg, input_url=raw, output_url=out))
        return go

    fns = {"plain": contender("plain", plain_cfg), "reasons": contender("reasons", reasons_cfg)}
    alternate(fns, 1)  # warm-up: the same for both
    s = alternate(fns, repeats)
    rows = runs["plain"][-1]["input"]
    explained = runs["reasons"][-1]["reason_codes"]
    for name in fns:
        remove_outputs(os.path.join(workdir, f"scores-{name}"))
    return {
        "reasons_rows": rows,
        "reasons_repeats": repeats,
        "reasons_plain_seconds": round(median(s["plain"]), 2),
        "reasons_plain_seconds_spread": spread(s["plain"]),
        "reasons_seconds": round(median(s["reasons"]), 2),
        "reasons_seconds_spread": spread(s["reasons"]),
        "reasons_steps": explained["steps"],
        "reasons_top_k": explained["top_k"],
        "reasons_max_completeness_gap": explained["max_completeness_gap"],
        "reason_codes_time_ratio": ratio_figure(s["reasons"], s["plain"])[0],
        "reason_codes_time_ratio_spread": ratio_figure(s["reasons"], s["plain"])[1],
        "scoring_plain_rows_per_s": round(rows / median(s["plain"])),
        "scoring_reasons_rows_per_s": round(rows / median(s["reasons"])),
    }
