"""Input pipeline throughput, side by side: ours vs petastorm's stock converter vs a raw pyarrow scan.

    python -m benchmarks.input_pipeline --rows 1000000 --rounds 3 [--out benchmarks/results/input.json]

All three read the same model-ready Parquet (a synthetic fraud-shaped split: 16 float32 and 9 int64
columns, ``shards.row_group_rows``-row row groups, 65,536 by default) and deliver batches of 1,024 rows:

* ``ours``: ``training.input.make_dataset`` (petastorm ``make_batch_reader`` + window shuffle +
  block hand-over to ``tf.data``), consumed inside a ``tf.function`` like Keras does;
* ``stock``: ``make_spark_converter(df).make_tf_dataset(batch_size=1024)``, consumed the same way
  (the converter's one-off materialization of the DataFrame is not timed);
* ``raw_pyarrow``: ``ParquetFile.read_row_group`` + ``to_numpy`` per column, no batching, no shuffle:
  the ceiling for anything that reads these files;
* ``ours_numpy`` (for the breakdown): our shuffled numpy batches before the hand-over to tf.data.

The three are measured in alternation, ``rounds`` times each, and the medians reported; the machine
may be shared, so alternating keeps background load from favouring one of them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
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


def measure(rows: int = 1_000_000, rounds: int = 3, stock_rows: int = 200_000, row_group_rows: int = 65536,
            workdir: str = "/tmp/downpour-bench-input", spark: Any = None) -> dict[str, Any]:
    """Rows/s of ours, the stock converter and a raw pyarrow scan (medians of alternating rounds)."""
    import pyarrow.parquet as pq

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
    converter = make_spark_converter(df)
    stock_batches = max(1, stock_rows // BATCH)

    def stock() -> int:
        with converter.make_tf_dataset(batch_size=BATCH, num_epochs=None) as ds:
            return int(count(ds.take(stock_batches)))

    samples: dict[str, list[float]] = {"ours": [], "stock": [], "raw_pyarrow": [], "ours_numpy": []}
    fns = {"ours": ours, "stock": stock, "raw_pyarrow": raw, "ours_numpy": ours_numpy}
    ours()  # warm up: trace the tf.function, fill the page cache
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            samples[name].append(n / (time.perf_counter() - t0))
    converter.delete()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "rows": rows,
        "row_group_rows": row_group_rows,
        "batch_size": BATCH,
        "rounds": rounds,
        "ours_rows_per_s": round(med["ours"]),
        "stock_converter_rows_per_s": round(med["stock"]),
        "raw_pyarrow_rows_per_s": round(med["raw_pyarrow"]),
        "ours_numpy_rows_per_s": round(med["ours_numpy"]),
        "ours_vs_stock": round(med["ours"] / med["stock"], 2),
        "ours_vs_raw_pyarrow": round(med["ours"] / med["raw_pyarrow"], 3),
        "samples_rows_per_s": {k: [round(x) for x in v] for k, v in samples.items()},
        "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stock-rows", type=int, default=200_000)
    p.add_argument("--row-group-rows", type=int, default=65536)
    p.add_argument("--workdir", default="/tmp/downpour-bench-input")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    result = measure(a.rows, a.rounds, a.stock_rows, a.row_group_rows, a.workdir)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
