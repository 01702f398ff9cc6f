"""Input pipeline throughput, side by side: ours vs petastorm's stock converter vs a raw pyarrow scan.

    python -m benchmarks.input_pipeline --rows 1000000 --rounds 3 [--out benchmarks/results/input.json]

All contenders read the same rows (a synthetic fraud-shaped train split of ``rows`` rows: 16 float32
and 9 int64 columns, ``shards.row_group_rows``-row row groups, 65,536 by default), every row exactly
once per pass (checked), and deliver batches of 1,024 rows:

* ``ours``: ``training.input.make_dataset`` (petastorm ``make_batch_reader`` + window shuffle +
  block hand-over to ``tf.data``), consumed inside a ``tf.function`` like Keras does;
* ``stock``: ``make_spark_converter(df).make_tf_dataset(batch_size=1024, num_epochs=1)`` as its
  documentation shows it (a context manager around one petastorm reader; row groups shuffled by the
  reader, no row shuffling queue by default), consumed the same way; the converter's one-off
  materialization of the DataFrame happens once, before the warm-up, and is not timed;
* ``raw_pyarrow``: ``ParquetFile.read_row_group`` + ``to_numpy`` per column, no batching, no shuffle:
  the ceiling for anything that reads these files;
* ``ours_numpy`` (for the breakdown): our shuffled numpy batches before the hand-over to tf.data.

Fairness: the same rows for every contender; one untimed warm-up pass of every contender; the same
timing window for all (``TIMING_WINDOW``: each timed pass builds its reader or dataset, reads every row
once and shuts the reader down, so reader start and stop are inside the window for everyone); then
``rounds`` rounds, each running every contender once (the order rotated from round to round). Reported:
each contender's median rows/s with its (min, max) and samples, and each figure as the median of the
per-round ratios with their (min, max).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from typing import Any

BATCH = 1024


def _count_fn() -> Any:
    import tensorflow as tf

    @tf.function
    def count(ds: Any) -> Any:
        n = tf.constant(0, tf.int64)
        for batch in ds:
            n += tf.cast(tf.shape(tf.nest.flatten(batch)[0])[0], tf.int64)
        return n

    return count


def _ensure_data(workdir: str, rows: int, row_group_rows: int) -> str:
    from benchmarks.synthetic import write_prepared

    root = os.path.join(workdir, f"rows-{rows}-rg-{row_group_rows}")
    if not os.path.exists(os.path.join(root, "done")):
        write_prepared(root, {"train": rows, "val": 1024, "test": 1024}, row_group_rows=row_group_rows,
                       files=max(1, rows // (4 * row_group_rows)), numeric=16, categorical=8, cardinality=50,
                       positive_rate=0.005)
        open(os.path.join(root, "done"), "w").close()
    return root


TIMING_WINDOW = ("reader/dataset construction and shutdown inside, for every contender: each timed pass builds "
                 "its reader (ours: make_dataset; stock: converter.make_tf_dataset(...) entered and exited; raw: "
                 "ParquetFile per file), delivers every row once, and stops; only the one-off data generation "
                 "and the converter's materialization of the DataFrame are outside")


def measure(rows: int = 1_000_000, rounds: int = 3, row_group_rows: int = 65536,
            workdir: str = "/tmp/downpour-bench-input", spark: Any = None) -> dict[str, Any]:
    """Rows/s of ours, the stock converter and a raw pyarrow scan, each reading the same ``rows`` rows
    once per pass: one untimed warm-up pass of every contender, then ``rounds`` rounds, contenders
    alternated within each round; per-contender medians and (min, max), and the per-round ratios."""
    import pyarrow.parquet as pq

    from benchmarks.common import ratio_figure, summary
    from downpour.logs import LOG
    from downpour.training.input import InputSpec, ReadOptions, iter_blocks, make_dataset, open_prepared

    root = _ensure_data(workdir, rows, row_group_rows)
    prepared = open_prepared(root)
    spec = InputSpec.from_feature_state(prepared.feature_state)
    train = prepared.split("train")
    files = sorted(glob.glob(os.path.join(train.url, "*.parquet")))
    count = _count_fn()

    def raw() -> int:
        n = 0
        for f in files:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=spec.columns)
                n += len([t.column(c).to_numpy() for c in spec.columns][0])
        return n

    opts = ReadOptions(batch_size=BATCH, num_epochs=1, shuffle=True, window_row_groups=4, reader_workers=2)

    def ours() -> int:
        return int(count(make_dataset(train.url, spec, opts)))

    def ours_numpy() -> int:
        return sum(block["label"].size for block in iter_blocks(train.url, spec, opts))

    if spark is None:
        from downpour.spark import get_spark

        spark = get_spark(master="local[2]")
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, "file://" + os.path.join(root, "cache"))
    df = spark.read.parquet("file://" + os.path.realpath(train.url)).select(*spec.columns)
    converter = make_spark_converter(df)  # materializes the DataFrame once (untimed, as documented)

    def stock() -> int:
        # the documented use: a context manager around one petastorm reader; one pass (num_epochs=1)
        with converter.make_tf_dataset(batch_size=BATCH, num_epochs=1) as ds:
            return int(count(ds))

    fns = {"ours": ours, "stock": stock, "raw_pyarrow": raw, "ours_numpy": ours_numpy}
    read: dict[str, list[int]] = {name: [] for name in fns}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    try:
        for name, fn in fns.items():  # warm-up, untimed: tf.function traces, page cache, thread pools
            read[name].append(fn())
        for i in range(rounds):
            # alternate, and rotate who goes first, so no contender always follows the same one
            order = list(fns)[i % len(fns):] + list(fns)[:i % len(fns)]
            for name in order:
                t0 = time.perf_counter()
                n = fns[name]()
                samples[name].append(n / (time.perf_counter() - t0))
                read[name].append(n)
                LOG.info("bench input %s round %d/%d: %d rows, %.0f rows/s", name, i + 1, rounds, n,
                         samples[name][-1])
    finally:
        converter.delete()
    for name, counts in read.items():
        if set(counts) != {train.rows}:
            raise RuntimeError(f"input benchmark: {name} read {sorted(set(counts))} rows per pass, not {train.rows}")
    per = {name: summary(v, 0) for name, v in samples.items()}
    vs_stock, vs_stock_spread = ratio_figure(samples["ours"], samples["stock"], 2)
    vs_raw, vs_raw_spread = ratio_figure(samples["ours"], samples["raw_pyarrow"], 3)
    return {
        "rows": rows,
        "rows_per_pass": {name: train.rows for name in fns},
        "row_group_rows": row_group_rows,
        "batch_size": BATCH,
        "rounds": rounds,
        "warm_up": "one untimed pass of every contender before round 1",
        "timing_window": TIMING_WINDOW,
        "ours_rows_per_s": per["ours"]["median"],
        "stock_converter_rows_per_s": per["stock"]["median"],
        "raw_pyarrow_rows_per_s": per["raw_pyarrow"]["median"],
        "ours_numpy_rows_per_s": per["ours_numpy"]["median"],
        "rows_per_s": per,
        "ours_vs_stock": vs_stock,
        "ours_vs_stock_spread": vs_stock_spread,
        "ours_vs_raw_pyarrow": vs_raw,
        "ours_vs_raw_pyarrow_spread": vs_raw_spread,
        "ratio_is": "median over rounds of (ours rows/s / theirs rows/s in the same round); spread: (min, max)",
        "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--row-group-rows", type=int, default=65536)
    p.add_argument("--workdir", default="/tmp/downpour-bench-input")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    result = measure(a.rows, a.rounds, a.row_group_rows, a.workdir)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
