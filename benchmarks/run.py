"""``make bench``: every benchmark in one run, ``benchmarks/results/latest.json`` and the README table.

    python -m benchmarks.run            # the full set (prepare at 200k and 2M rows; about 40 minutes here)
    python -m benchmarks.run --quick    # the same measurements on small data (a smoke check)
    python -m benchmarks.run --only input,peer   # some sections; the others keep their last values

Each figure is a ratio of contenders run side by side in this run: the same data, the same warm-up,
the same timing window, alternated and repeated (at least 3 times in full mode, 2 in quick mode); the
figure is the median of the per-round ratios and ``spreads`` holds their (min, max) (see
``benchmarks/common.py``). Absolute seconds are kept in the JSON for context only. ``goals`` holds each
goal, ``goals_met`` whether the figure meets it (null: not measured), ``gpu`` whether a GPU was used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LATEST = os.path.join(RESULTS, "latest.json")
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SECTIONS = ("input", "prepare", "training", "scoring", "peer")

# key -> (what, goal as (op, value) or None for "report"). Goals: the project's targets for each figure.
GOALS: dict[str, tuple[str, tuple[str, float] | None]] = {
    "input_vs_stock_converter": ("input pipeline rows/s / petastorm `make_spark_converter(...).make_tf_dataset`"
                                 " (same rows, batch 1024, reader start and stop timed for both)", (">=", 10)),
    "input_vs_raw_pyarrow": ("input pipeline rows/s / a raw pyarrow scan of the same shards", (">=", 0.5)),
    "train_vs_in_memory": ("training examples/s of one worker through the input pipeline / the same model on the "
                           "same rows as in-memory tensors (`from_tensor_slices`)", (">=", 0.9)),
    "train_vs_in_memory_streamed": ("the same with `training.input_cache_mb=0`: the shards decoded by petastorm "
                                    "every epoch (a worker whose share exceeds the budget)", None),
    "horovod_2v1_speedup_fixed_threads": ("training examples/s, 2 Horovod workers / 1, one TensorFlow thread and "
                                          "one reader thread per worker (same per-worker batch)", (">=", 1.8)),
    "horovod_2v1_speedup_same_machine": ("the same, 1 worker on every core / 2 workers on half each: the same "
                                         "machine either way, so not a data-parallel figure", None),
    "horovod_2v1_speedup_same_global_batch": ("the same, 2 workers at half the per-worker batch (same global "
                                              "batch)", None),
    "horovod_grouped_vs_per_gradient": ("training examples/s of the 2 fixed-thread workers averaging all gradients "
                                        "in one grouped allreduce (`training.allreduce_groups: 1`, the default) / "
                                        "one allreduce per gradient (`0`, Horovod's default)", None),
    "prepare_vs_bare_io": ("`prepare` wall time / bare Spark read-CSV-write-Parquet, same raw data", ("<=", 5)),
    "prepare_no_windows_vs_bare_io": ("the same without velocity window features", ("<=", 3)),
    "prepare_10x_scaling": ("`prepare` time on 10x rows / on 1x", ("<=", 11)),
    "peer_kerasestimator_time_ratio": ("our prepare+train+score time / `KerasEstimator` fit+transform",
                                       ("<=", 0.5)),
    "peer_kerasestimator_auc_delta": ("our test ROC-AUC minus `KerasEstimator`'s", (">=", 0)),
    "score_vs_bare_io": ("`downpour score` wall time (window features over the entity history) / bare Spark "
                         "read-CSV-write-Parquet, same raw rows", ("<=", 3)),
    "score_10x_scaling": ("`downpour score` time on 10x raw rows / on 1x", ("<=", 11)),
    "scoring_rows_per_s": ("batch scoring rows/s (`downpour score` with entity history, raw rows in, Parquet out)",
                           None),
    "scoring_peak_rss_mb": ("peak RSS of a Python worker while scoring (MiB)", None),
    "scoring_plain_rows_per_s": ("`downpour score` rows/s without reason codes (1x raw rows, entity history)", None),
    "scoring_reasons_rows_per_s": ("the same with reason codes (`scoring.reason_codes`: top 3, 16 steps)", None),
    "reason_codes_time_ratio": ("`score` wall time with reason codes / without, same rows, alternated", None),
    "train_peak_rss_10x_ratio": ("peak training-worker RSS on 10x rows / on 1x, streaming "
                                 "(`training.input_cache_mb=0`)", ("<=", 1.2)),
    "train_peak_rss_10x_ratio_default": ("the same with the shipped `training.input_cache_mb`: a share that fits "
                                         "is held in memory", None),
}

SIZES = {
    # input: the stock converter reads 65-120k rows/s here, so 1M rows x (warm-up + 5 rounds) is 1-2 minutes
    "full": {"input_rows": 1_000_000, "input_rounds": 5,
             # 200k -> 2M: prepare of 10M rows in local[2] with a 4 GiB driver runs out of heap here
             # (README, Troubleshooting); on a bigger machine: --size prepare_rows=1000000
             "prepare_rows": 200_000, "prepare_repeats": 3, "scale": 10,
             # epochs: 2 timed after the first (a timed epoch of the 200k rows is about a second)
             "train_repeats": 3, "train_epochs": 3, "in_memory_epochs": 5,
             # peer: a pair (ours, then the peer) took ~375 s at 100k rows, ~175 s at 40k (ours 67 s; peer
             # 106 s, 75 of them its per-row transform): warm-up + 3 pairs at 40k is ~10 minutes. 40k rows
             # give 6,000 test rows with ~28 positives (AUC standard error ~0.05, reported); for an AUC
             # comparison finer than that: --size peer_rows=100000 (~20 minutes)
             "peer_rows": 40_000, "peer_epochs": 2, "peer_repeats": 3},
    "quick": {"input_rows": 200_000, "input_rounds": 2,
              "prepare_rows": 50_000, "prepare_repeats": 2, "scale": 10,
              "train_repeats": 2, "train_epochs": 2, "in_memory_epochs": 3,
              "peer_rows": 20_000, "peer_epochs": 1, "peer_repeats": 2},
}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import horovod
    import numpy
    import petastorm
    import pyarrow
    import pyspark
    import tensorflow as tf

    mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"tensorflow": tf.__version__, "horovod": horovod.__version__, "pyspark": pyspark.__version__,
                     "petastorm": petastorm.__version__, "pyarrow": pyarrow.__version__, "numpy": numpy.__version__},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def commit() -> str | None:
    """The commit measured, marked ``-dirty`` when the working tree had uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return None
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def goal_text(goal: tuple[str, float] | None) -> str:
    return f"{goal[0]} {goal[1]}" if goal else "report"


def goals() -> dict[str, dict[str, Any]]:
    """The goals of the figures that have one: ``{key: {"op": ">=" | "<=", "value": N}}``."""
    return {k: {"op": g[0], "value": g[1]} for k, (_, g) in GOALS.items() if g}


def goals_met(figures: dict[str, Any], targets: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    """Per goal: true/false from the figure, null when the figure was not measured."""
    out: dict[str, bool | None] = {}
    for key, g in targets.items():
        value = figures.get(key)
        if value is None:
            out[key] = None
        else:
            out[key] = bool(value >= g["value"] if g["op"] == ">=" else value <= g["value"])
    return out


def verdict(met: bool | None, has_goal: bool, measured: bool) -> str:
    if not measured:
        return "not measured"
    if not has_goal:
        return "reported"
    return "met" if met else "**missed**"


def _shown(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value}"


def render_markdown(result: dict[str, Any]) -> str:
    """The table the README includes (regenerated by every run; ``tests/test_docs.py`` checks it)."""
    m = result.get("machine", {})
    v = m.get("versions", {})
    sec = result.get("sections", {})
    pr, tr = sec.get("prepare", {}), sec.get("training", {})
    sizes = "; ".join(x for x in (
        f"input pipeline {sec['input']['rows']:,} rows" if "input" in sec else "",
        f"prepare {pr['rows']:,} and {pr['rows'] * pr['scale']:,} raw fraud rows" if pr else "",
        f"training on the prepared {tr['prepared_rows']:,}-row data" if "prepared_rows" in tr else "",
        f"scoring {sec['scoring']['scoring_rows']:,} raw rows" if "scoring" in sec else "",
        f"peer comparison {sec['peer']['rows']:,} rows" if "peer" in sec else "",
    ) if x)
    gpu = result.get("gpu") or {}
    gpu_text = (f" GPU: not measured ({gpu.get('why')})." if gpu and not gpu.get("measured")
                else " GPU: measured." if gpu else "")
    targets = result.get("goals") or goals()
    figures = result.get("figures", {})
    met = result.get("goals_met") or goals_met(figures, targets)
    reached = [k for k, ok in met.items() if ok]
    measured = [k for k, ok in met.items() if ok is not None]
    lines = [
        f"Measured by `python -m benchmarks.run` ({result.get('mode', 'full')} mode) on "
        f"{result.get('finished_at', '?')} (commit "
        f"{result.get('commit') or 'not recorded'}): {m.get('cpus')} CPUs, "
        f"{m.get('memory_gib')} GiB, {m.get('gpus', 0)} GPUs; TensorFlow {v.get('tensorflow')}, Horovod "
        f"{v.get('horovod')}, PySpark {v.get('pyspark')}, petastorm {v.get('petastorm')}, pyarrow "
        f"{v.get('pyarrow')}; load average at start {m.get('load_average_at_start')}. Sizes: {sizes or '-'}. "
        "Each ratio compares contenders run side by side in the same run (the same data and warm-up, "
        "alternated, repeated): the figure is the median of the per-round ratios, the spread their "
        "(min, max); raw numbers and per-section timings are in `benchmarks/results/latest.json`."
        f"{gpu_text} Goals met: {len(reached)} of {len(measured)} measured ({len(targets)} goals).",
        *([] if "spreads" in result else [
            "", "**This result predates the current method** (figures were ratios of medians, without spreads, "
            "and the input figure compared unequal row counts); figures renamed or added since show as not "
            "measured. Re-run `make bench`."]),
        "",
        "| key | what | median | spread (min, max) | goal | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    spreads = result.get("spreads", {})
    for key, (what, goal) in GOALS.items():
        value = figures.get(key)
        sp = spreads.get(key)
        sp_text = "-" if not sp else f"{_shown(sp[0])} - {_shown(sp[1])}"
        t = targets.get(key)
        lines.append(f"| `{key}` | {what} | {_shown(value)} | {sp_text} | "
                     f"{goal_text((t['op'], t['value'])) if t else goal_text(goal)} | "
                     f"{verdict(met.get(key), bool(t), value is not None)} |")
    notes = result.get("notes") or []
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines) + "\n"


def update_readme(markdown: str, readme: str = README) -> None:
    """Replace what sits between the bench markers in the README."""
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {BEGIN} / {END} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{head}{BEGIN}\n{markdown}{END}{tail}")
    os.replace(tmp, readme)


def _figures(sections: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(figures, spreads): each key of ``GOALS`` from whichever section measured it, and its (min, max)."""
    flat: dict[str, Any] = {}
    for data in sections.values():
        flat.update(data)
    return {k: flat.get(k) for k in GOALS}, {k: flat.get(f"{k}_spread") for k in GOALS}


def _gpu(info: dict[str, Any]) -> dict[str, Any]:
    """Whether anything here ran on a GPU: nothing does without one (``tf.config.list_physical_devices``)."""
    if not info.get("gpus"):
        return {"measured": False, "why": "no GPU machine was lent to this run"}
    return {"measured": False, "visible": info["gpus"],
            "why": f"{info['gpus']} GPU(s) visible, but no section of this suite places work on a GPU"}


def _notes(sections: dict[str, dict[str, Any]]) -> list[str]:
    """What each section says about its own figures (``notes`` in a section)."""
    return [f"{name}: {n}" for name in SECTIONS for n in (sections.get(name, {}).get("notes") or [])]


def run(mode: str, only: set[str], workdir: str) -> dict[str, Any]:
    from downpour.spark import get_spark

    size = SIZES[mode]
    measured = commit()  # the code measured: taken before the run, whatever is edited meanwhile
    previous: dict[str, Any] = {}
    if os.path.exists(LATEST) and only != set(SECTIONS):
        with open(LATEST) as f:
            previous = json.load(f)
    sections: dict[str, dict[str, Any]] = dict(previous.get("sections", {}))
    timings: dict[str, float] = dict(previous.get("section_seconds", {}))
    spark = get_spark(master="local[2]")
    info = machine()

    def section(name: str, fn: Any) -> None:
        if name not in only:
            return
        t0 = time.perf_counter()
        sections[name] = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: sections[name]}, indent=2), flush=True)

    from benchmarks import input_pipeline, prepare_scaling, scoring, train_in_memory, training_scaling

    section("input", lambda: _input(input_pipeline, size, workdir, spark))
    prep: dict[str, Any] = {}
    needs_prepared = only & {"prepare", "training", "scoring"}
    if needs_prepared:
        section("prepare", lambda: prepare_scaling.measure(
            spark, workdir, size["prepare_rows"], size["prepare_repeats"], size["scale"]))
        prep = sections["prepare"] if "prepare" in only else _ensure_prepared(spark, workdir, size)
    if "training" in only:
        section("training", lambda: {
            "prepared_rows": prep.get("rows", size["prepare_rows"]),
            **training_scaling.measure_scaling(spark, prep["raw_small"], prep["prepared_small"],
                                               size["train_repeats"], size["train_epochs"]),
            "in_memory": train_in_memory.measure(prep["raw_small"], prep["prepared_small"], size["train_repeats"],
                                                 size["in_memory_epochs"], workdir),
            **training_scaling.measure_memory(spark, prep["raw_small"], prep["prepared_small"],
                                              prep["raw_big"], prep["prepared_big"]),
        })
        im = sections["training"]["in_memory"]
        sections["training"].update({k: im[k] for k in ("train_vs_in_memory", "train_vs_in_memory_spread",
                                                         "train_vs_in_memory_streamed",
                                                         "train_vs_in_memory_streamed_spread")})
    if "scoring" in only:
        if not _has_explain(os.path.join(prep["prepared_small"], "model", "model_card.json")):
            # any model of the shipped config will do (one with the explain signature): one epoch on 1x rows
            training_scaling.train(spark, prep["raw_small"], prep["prepared_small"], "training.epochs=1",
                                    "training.workers=1")
        section("scoring", lambda: {
            **scoring.measure(spark, prep["raw_big"], prep["prepared_small"], workdir, raw_small=prep["raw_small"]),
            **scoring.measure_reasons(spark, prep["raw_small"], prep["prepared_small"], workdir),
        })
    if "peer" in only:
        from benchmarks import peer_estimator

        # Both sides train on every train row (the peer has no downsampling), so the AUCs compare
        # models that saw the same examples for the same number of steps.
        section("peer", lambda: peer_estimator.measure(spark, os.path.join(workdir, "peer"),
                                                       rows=size["peer_rows"], epochs=size["peer_epochs"],
                                                       repeats=size["peer_repeats"],
                                                       overrides=["training.imbalance=none"]))
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    figures, spreads = _figures(sections)
    targets = goals()
    return {"mode": mode, "finished_at": now, "commit": measured, "machine": info, "gpu": _gpu(info),
            "sizes": size, "figures": figures, "spreads": spreads, "goals": targets,
            "goals_met": goals_met(figures, targets), "sections": sections, "section_seconds": timings,
            "notes": _notes(sections)}


def _has_explain(card: str) -> bool:
    """A model (from an earlier run) that reason codes can use."""
    try:
        with open(card) as f:
            return bool(json.load(f).get("explain"))
    except (OSError, ValueError):
        return False


def _input(module: Any, size: dict[str, Any], workdir: str, spark: Any) -> dict[str, Any]:
    r = module.measure(rows=size["input_rows"], rounds=size["input_rounds"], workdir=os.path.join(workdir, "input"),
                       spark=spark)
    return {**r, "input_vs_stock_converter": r["ours_vs_stock"],
            "input_vs_stock_converter_spread": r["ours_vs_stock_spread"],
            "input_vs_raw_pyarrow": r["ours_vs_raw_pyarrow"],
            "input_vs_raw_pyarrow_spread": r["ours_vs_raw_pyarrow_spread"]}


def _ensure_prepared(spark: Any, workdir: str, size: dict[str, Any]) -> dict[str, Any]:
    """The prepared small/big outputs a training or scoring section needs, built once if missing."""
    from benchmarks.common import fraud_config, raw_fraud
    from downpour import api

    rows, scale = size["prepare_rows"], size["scale"]
    out = os.path.join(workdir, "prepare")
    paths = {"raw_small": raw_fraud(spark, workdir, rows), "raw_big": raw_fraud(spark, workdir, rows * scale),
             "prepared_small": os.path.join(out, "small"), "prepared_big": os.path.join(out, "big")}
    for raw, dest in ((paths["raw_small"], paths["prepared_small"]), (paths["raw_big"], paths["prepared_big"])):
        api.prepare(fraud_config(raw, dest), spark=spark)  # a no-op when already prepared
    return paths


def main() -> None:
    from downpour.logs import setup_logging

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small data: a smoke check of every benchmark")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--workdir", default=os.environ.get("DOWNPOUR_BENCH_DIR", "/tmp/downpour-bench"))
    p.add_argument("--size", action="append", default=[], metavar="KEY=N",
                   help=f"override one size of the mode, e.g. prepare_rows=300000 (keys: {sorted(SIZES['full'])})")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    a = p.parse_args()
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    setup_logging()
    os.environ.setdefault("DOWNPOUR_PII_SALT", "bench-salt-not-secret")
    mode = "quick" if a.quick else "full"
    for item in a.size:
        key, _, value = item.partition("=")
        if key not in SIZES[mode] or not value.isdigit():
            raise SystemExit(f"--size {item!r}: expected KEY=N with KEY one of {sorted(SIZES[mode])}")
        SIZES[mode][key] = int(value)
    workdir = os.path.join(a.workdir, mode)
    result = run(mode, only, workdir)
    os.makedirs(RESULTS, exist_ok=True)
    tmp = LATEST + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, LATEST)
    markdown = render_markdown(result)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(markdown)
    if not a.no_readme:
        update_readme(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
