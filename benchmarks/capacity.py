"""Where `prepare`'s time and shuffle bytes go, per step, and what that projects for a cluster.

    python -m benchmarks.capacity --rows 200000 --scale 10

Runs `prepare` on the synthetic fraud data at ``rows`` and ``scale x rows`` (after a small warm-up) and
a bare read-CSV/write-Parquet of the larger input, and reads back from Spark's own status API (the UI's
REST endpoint, ``/api/v1/applications/<id>/stages``) every stage each run submitted. Each stage is
charged to the prepare step (`pipelines/prepare.py::_step`) whose wall-clock window holds its submission.
Per step it records wall seconds, task core-seconds (``executorRunTime``), bytes read from the input,
shuffle bytes written, and bytes written to files.

The projection (`project`) is a model, not a measurement: per step, core-seconds per row and shuffle
bytes per row from the larger run, times the projected rows, spread over ``cores`` with the stated
efficiency; a step's time is the larger of its compute time and its shuffle time over the stated
network bandwidth per core. ``check`` compares what the model, fitted on one run, says of the other
run's wall time with what was measured. Results go to ``benchmarks/results/capacity.json`` (with the
date and commit) and are read into ``benchmarks/README.md`` by hand, with that file named as the source.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from benchmarks.common import bare_io, fraud_config, raw_fraud

# The stated assumptions of the projection (`project`): each can be overridden on the command line.
ASSUMPTIONS = {
    "efficiency": 0.7,  # the share of ideal speed-up on many executors (stragglers, scheduling, GC)
    "shuffle_mb_s_per_core": 50.0,  # shuffle write + fetch bandwidth per executor core (disk and network)
    "driver_footer_mb_s": 200.0,  # the driver's read-hash-rewrite of each shard file (local file systems)
    "row_group_rows": 16384,  # conf/fraud.yaml: one file per row group
}


@contextlib.contextmanager
def _step_windows(windows: list[tuple[str, float, float]]) -> Iterator[None]:
    """Record (step, start, end) in epoch seconds for every prepare step, by wrapping `prepare._step`."""
    from downpour.pipelines import prepare

    original = prepare._step

    @contextlib.contextmanager
    def recording(what: str, timings: dict[str, float], key: str) -> Iterator[None]:
        t0 = time.time()
        with original(what, timings, key):
            yield
        windows.append((key, t0, time.time()))

    prepare._step = recording
    try:
        yield
    finally:
        prepare._step = original


def _stages(spark: Any) -> list[dict[str, Any]]:
    """Every completed stage of this application, from the status API."""
    sc = spark.sparkContext
    url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages?status=complete"
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - the driver's own UI
        return json.loads(resp.read())


def _epoch(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%Z").replace(tzinfo=dt.UTC).timestamp()


def charge(stages: list[dict[str, Any]], windows: list[tuple[str, float, float]], since: float,
           until: float) -> dict[str, dict[str, float]]:
    """Per step: wall seconds, stages, tasks, core-seconds, input, shuffle-write and output bytes."""
    out: dict[str, dict[str, float]] = {k: {"wall_s": round(b - a, 3), "stages": 0, "tasks": 0, "core_s": 0.0,
                                            "input_bytes": 0, "shuffle_write_bytes": 0, "output_bytes": 0}
                                        for k, a, b in windows}
    for st in stages:
        t = _epoch(st["submissionTime"])
        if not since <= t <= until:
            continue
        key = next((k for k, a, b in windows if a <= t <= b), "other")
        row = out.setdefault(key, {"wall_s": 0.0, "stages": 0, "tasks": 0, "core_s": 0.0, "input_bytes": 0,
                                   "shuffle_write_bytes": 0, "output_bytes": 0})
        row["stages"] += 1
        row["tasks"] += st["numCompleteTasks"]
        row["core_s"] = round(row["core_s"] + st["executorRunTime"] / 1000, 3)
        row["input_bytes"] += st["inputBytes"]
        row["shuffle_write_bytes"] += st["shuffleWriteBytes"]
        row["output_bytes"] += st["outputBytes"]
    return out


def measure_prepare(spark: Any, raw: str, out: str) -> dict[str, Any]:
    """One forced prepare of ``raw``, its wall time and its cost per step."""
    from downpour import api

    windows: list[tuple[str, float, float]] = []
    t0 = time.time()
    with _step_windows(windows):
        manifest = api.prepare(fraud_config(raw, out), spark=spark, force=True)
    t1 = time.time()
    time.sleep(2)  # the status API lags the last stage's completion slightly
    steps = charge(_stages(spark), windows, t0, t1)
    files = sum(s["files"] for s in manifest["splits"].values())
    return {"rows": manifest["counts"]["input"], "wall_s": round(t1 - t0, 2), "steps": steps,
            "shard_files": files, "shard_bytes": sum(s["bytes"] for s in manifest["splits"].values())}


def measure_bare(spark: Any, raw: str, out: str) -> dict[str, Any]:
    t0 = time.time()
    bare_io(spark, raw, out)
    t1 = time.time()
    time.sleep(2)
    return {"wall_s": round(t1 - t0, 2), "steps": charge(_stages(spark), [("bare_io", t0, t1)], t0, t1)}


def per_row(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Core-seconds and shuffle bytes per input row, per step."""
    n = run["rows"]
    return {k: {"core_us_per_row": v["core_s"] * 1e6 / n, "shuffle_bytes_per_row": v["shuffle_write_bytes"] / n}
            for k, v in run["steps"].items()}


def project(costs: dict[str, dict[str, float]], rows: int, cores: int, a: dict[str, float]) -> dict[str, Any]:
    """Projected wall seconds per step for ``rows`` on ``cores``: max(compute, shuffle), then the driver's
    footer pass and the file count, which do not scale with the cores."""
    steps = {}
    for k, c in costs.items():
        compute = c["core_us_per_row"] * rows / 1e6 / (cores * a["efficiency"])
        shuffle = c["shuffle_bytes_per_row"] * rows / (cores * a["shuffle_mb_s_per_core"] * 1e6)
        steps[k] = {"compute_s": round(compute, 1), "shuffle_s": round(shuffle, 1),
                    "shuffle_gb": round(c["shuffle_bytes_per_row"] * rows / 1e9, 1)}
    total = sum(max(v["compute_s"], v["shuffle_s"]) for v in steps.values())
    bottleneck = max(steps, key=lambda k: max(steps[k]["compute_s"], steps[k]["shuffle_s"]))
    return {"rows": rows, "cores": cores, "wall_s": round(total, 1), "steps": steps, "bottleneck": bottleneck,
            "shuffle_gb": round(sum(v["shuffle_gb"] for v in steps.values()), 1)}


def check(fitted_on: dict[str, Any], other: dict[str, Any], cores: int) -> dict[str, Any]:
    """What the per-row model fitted on one run says of the other run's wall time, against the measurement
    (efficiency 1 and no shuffle limit: the same machine)."""
    costs = per_row(fitted_on)
    predicted = sum(c["core_us_per_row"] for c in costs.values()) * other["rows"] / 1e6 / cores
    return {"fitted_on_rows": fitted_on["rows"], "predicted_rows": other["rows"], "predicted_s": round(predicted, 1),
            "measured_s": other["wall_s"], "measured_over_predicted": round(other["wall_s"] / predicted, 2)}


def main() -> None:
    from benchmarks.run import commit
    from downpour.logs import setup_logging
    from downpour.spark import get_spark

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--workdir", default="/tmp/downpour-bench/capacity")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "capacity.json"))
    for k, v in ASSUMPTIONS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args()
    os.environ.setdefault("DOWNPOUR_PII_SALT", "bench-salt-not-secret")
    assumptions = {k: getattr(args, k) for k in ASSUMPTIONS}
    measured = commit()
    spark = get_spark(master="local[2]")
    cores = spark.sparkContext.defaultParallelism
    small, big = (raw_fraud(spark, args.workdir, n) for n in (args.rows, args.rows * args.scale))
    warm = raw_fraud(spark, args.workdir, 5_000)
    measure_prepare(spark, warm, os.path.join(args.workdir, "out-warm"))
    runs = {"small": measure_prepare(spark, small, os.path.join(args.workdir, "out-small")),
            "big": measure_prepare(spark, big, os.path.join(args.workdir, "out-big"))}
    runs["bare_io_big"] = measure_bare(spark, big, os.path.join(args.workdir, "bare-big"))
    costs = per_row(runs["big"])
    result = {
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": measured,
        "cores": cores,
        "assumptions": assumptions,
        "runs": runs,
        "per_row": {k: {m: round(x, 2) for m, x in v.items()} for k, v in costs.items()},
        "check": [check(runs["big"], runs["small"], cores), check(runs["small"], runs["big"], cores)],
        "projection_1b": [project(costs, 1_000_000_000, c, assumptions) for c in (50, 200)],
        "shard_files_1b": -(-1_000_000_000 // assumptions["row_group_rows"]),
        "driver_footer_pass_1b_s": round(runs["big"]["shard_bytes"] / runs["big"]["rows"] * 1e9
                                         / (assumptions["driver_footer_mb_s"] * 1e6), 1),
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(json.dumps({k: result[k] for k in ("check", "projection_1b", "shard_files_1b",
                                             "driver_footer_pass_1b_s")}, indent=2))


if __name__ == "__main__":
    main()
