"""``prepare`` against a bare Spark read-CSV/write-Parquet job, and its scaling from 1x to 10x rows.

    python -m benchmarks.prepare_scaling --rows 1000000 --repeats 3

* ``prepare``: the whole stage (ingest, clean, quarantine, split, velocity/RFM window features,
  fit features on train, shards, atomic publish), forced to rebuild each time;
* ``prepare_no_windows``: the same with ``features.velocity.enabled=false``;
* ``bare_io``: ``spark.read.csv(header=True)`` of the same raw files (all columns as text, as our
  ingest reads them) written straight back as Parquet: the floor for any job that reads and writes
  this data once.

At ``rows`` the three alternate ``repeats`` times (medians); at ``10 x rows`` prepare and bare I/O run
``big_repeats`` times each (with and without windows), which gives ``prepare_10x_scaling`` (linear
is 10; the ratio of the medians, its spread over every (10x run, 1x run) pair). ``prepare_vs_bare_io``
and ``prepare_no_windows_vs_bare_io`` are the medians over rounds of the ratio within the round, with
their (min, max).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

from benchmarks.common import alternate, bare_io, fraud_config, median, ratio_figure, raw_fraud


def _prepare(spark: Any, raw: str, out: str, *overrides: str) -> dict[str, Any]:
    from downpour import api

    return api.prepare(fraud_config(raw, out, *overrides), spark=spark, force=True)


def _bare(spark: Any, raw: str, out: str) -> None:
    bare_io(spark, raw, out)


def measure(spark: Any, workdir: str, rows: int = 1_000_000, repeats: int = 3, scale: int = 10,
            big_repeats: int = 1) -> dict[str, Any]:
    """Wall-time ratios of prepare to bare I/O at ``rows`` and ``scale x rows``, and 10x scaling."""
    small = raw_fraud(spark, workdir, rows)
    big = raw_fraud(spark, workdir, rows * scale)
    out = os.path.join(workdir, "prepare")
    manifest: dict[str, Any] = {}
    # Warm-up on a small input: the JVM compiles Spark's code paths on first use, which would
    # otherwise be charged to whichever job happens to run first.
    warm = raw_fraud(spark, workdir, 5_000)
    _prepare(spark, warm, os.path.join(out, "warm-up"))
    _bare(spark, warm, os.path.join(out, "bare-warm-up"))

    def prep_small() -> None:
        manifest.update(_prepare(spark, small, os.path.join(out, "small")))

    s = alternate({
        "prepare": prep_small,
        "prepare_no_windows": lambda: _prepare(spark, small, os.path.join(out, "small-nowin"),
                                               "features.velocity.enabled=false"),
        "bare_io": lambda: _bare(spark, small, os.path.join(out, "bare-small")),
    }, repeats)
    b = alternate({
        "prepare": lambda: _prepare(spark, big, os.path.join(out, "big")),
        "prepare_no_windows": lambda: _prepare(spark, big, os.path.join(out, "big-nowin"),
                                               "features.velocity.enabled=false"),
        "bare_io": lambda: _bare(spark, big, os.path.join(out, "bare-big")),
    }, big_repeats)
    for name in ("bare-small", "bare-big", "bare-warm-up", "warm-up", "small-nowin", "big-nowin"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    p1, p10 = median(s["prepare"]), median(b["prepare"])
    vs_bare = ratio_figure(s["prepare"], s["bare_io"])
    nowin_vs_bare = ratio_figure(s["prepare_no_windows"], s["bare_io"])
    # 10x: the big runs are fewer than the small ones, so the spread is over every (big, small) pair
    norm = 10 / scale
    cross = [x * norm / y for x in b["prepare"] for y in s["prepare"]]
    return {
        "rows": rows,
        "scale": scale,
        "repeats": repeats,
        "big_repeats": big_repeats,
        "prepare_seconds": round(p1, 2),
        "prepare_no_windows_seconds": round(median(s["prepare_no_windows"]), 2),
        "bare_io_seconds": round(median(s["bare_io"]), 2),
        "prepare_big_seconds": round(p10, 2),
        "bare_io_big_seconds": round(median(b["bare_io"]), 2),
        "prepare_rows_per_s": round(rows / p1),
        "prepare_no_windows_rows_per_s": round(rows / median(s["prepare_no_windows"])),
        "prepare_no_windows_big_seconds": round(median(b["prepare_no_windows"]), 2),
        "prepare_big_rows_per_s": round(rows * scale / p10),
        "prepare_no_windows_big_rows_per_s": round(rows * scale / median(b["prepare_no_windows"])),
        "prepare_vs_bare_io": vs_bare[0],
        "prepare_vs_bare_io_spread": vs_bare[1],
        "prepare_no_windows_vs_bare_io": nowin_vs_bare[0],
        "prepare_no_windows_vs_bare_io_spread": nowin_vs_bare[1],
        "prepare_vs_bare_io_big": round(p10 / median(b["bare_io"]), 2),
        "prepare_no_windows_vs_bare_io_big": round(median(b["prepare_no_windows"]) / median(b["bare_io"]), 2),
        "prepare_10x_scaling": round(p10 / p1 * norm, 2),
        "prepare_10x_scaling_spread": [round(min(cross), 2), round(max(cross), 2)],
        "prepare_no_windows_10x_scaling": round(median(b["prepare_no_windows"]) / median(s["prepare_no_windows"])
                                                * 10 / scale, 2),
        "bare_io_10x_scaling": round(median(b["bare_io"]) / median(s["bare_io"]) * 10 / scale, 2),
        "samples_seconds": {**{k: [round(x, 2) for x in v] for k, v in s.items()},
                            **{f"{k}_big": [round(x, 2) for x in v] for k, v in b.items()}},
        "prepared_small": os.path.join(out, "small"),
        "prepared_big": os.path.join(out, "big"),
        "raw_small": small,
        "raw_big": big,
        "quarantined_small": manifest.get("counts", {}).get("quarantined"),
    }


def main() -> None:
    from downpour.logs import setup_logging
    from downpour.spark import get_spark

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--workdir", default="/tmp/downpour-bench")
    a = p.parse_args()
    os.environ.setdefault("DOWNPOUR_PII_SALT", "bench-salt-not-secret")
    print(json.dumps(measure(get_spark(master="local[2]"), a.workdir, a.rows, a.repeats, a.scale), indent=2))


if __name__ == "__main__":
    main()
