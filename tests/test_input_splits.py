"""Input splits that fill whole waves of the cores (``downpour.spark.input_split_settings``).

The split size is chosen from a model of how Spark plans a file scan (``scan_tasks``), so the model is
checked against Spark's own planning, and the chosen size against the tasks Spark then runs."""

from __future__ import annotations

import gzip
import random
from types import SimpleNamespace as File

import pytest

from downpour.spark import MAX_SPLIT_KEY, _makespan, input_split_settings, scan_tasks, session_conf

KIB = 1024
# small files stand in for large ones: the session's ceiling and open cost scaled down alike
SMALL = {MAX_SPLIT_KEY: str(256 * KIB), "spark.sql.files.openCostInBytes": str(8 * KIB)}


def _write(path, size: int, packed: bool = False) -> None:
    line = b"x" * 99 + b"\n"
    data = (line * (size // len(line) + 1))[:size - 1] + b"\n"
    if packed:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _files(tmp_path, sizes: list[int], packed: tuple[int, ...] = ()) -> list[File]:
    out = []
    for i, size in enumerate(sizes):
        p = tmp_path / (f"f{i:02d}.txt.gz" if i in packed else f"f{i:02d}.txt")
        _write(p, size, i in packed)
        out.append(File(path=str(p), size=p.stat().st_size))
    return out


def _spark_tasks(spark, files: list[File]) -> int:
    return spark.read.text([f.path for f in files]).rdd.getNumPartitions()


def _spark_task_bytes(spark, files: list[File], open_cost: int) -> list[int]:
    """The bytes of each task of Spark's scan, from the blocks its rows came from (each with an open cost)."""
    from pyspark.sql import functions as F

    blocks = spark.read.text([f.path for f in files]).select(
        F.spark_partition_id().alias("task"), F.input_file_name().alias("f"),
        F.input_file_block_start().alias("s"), F.input_file_block_length().alias("n")).distinct()
    per_task = blocks.groupBy("task").agg(F.sum(F.col("n") + F.lit(open_cost)).alias("b")).collect()
    return sorted(int(r["b"]) for r in per_task)


@pytest.mark.parametrize("seed", range(6))
def test_the_scan_model_plans_as_many_tasks_as_spark(spark, tmp_path, seed):
    """Random file sizes (some compressed, so read whole), at two ceilings: the model's task count is
    Spark's."""
    rng = random.Random(seed)
    sizes = [rng.randint(2 * KIB, 700 * KIB) for _ in range(rng.randint(1, 7))]
    files = _files(tmp_path, sizes, packed=tuple(i for i in range(len(sizes)) if rng.random() < 0.2))
    (tmp_path / "empty.txt").write_bytes(b"")  # no task, and not part of the split size either
    files.append(File(path=str(tmp_path / "empty.txt"), size=0))
    splittable = [not f.path.endswith(".gz") for f in files]
    for cap in (256 * KIB, 96 * KIB):
        with session_conf(spark, {**SMALL, MAX_SPLIT_KEY: str(cap)}):
            planned = scan_tasks([f.size for f in files], splittable, cap, 8 * KIB,
                                 spark.sparkContext.defaultParallelism)
            assert len(planned) == _spark_tasks(spark, files), (sizes, cap)
            if not any(f.path.endswith(".gz") for f in files):  # a gzip block's length is unknown (-1)
                assert sorted(planned) == _spark_task_bytes(spark, files, 8 * KIB), (sizes, cap)


def _span(spark, files: list[File], cap: int) -> int:
    """When the model's tasks of a scan at ``cap`` end on the session's cores (bytes of the busiest)."""
    slots = spark.sparkContext.defaultParallelism
    return _makespan(scan_tasks([f.size for f in files], [True] * len(files), cap, 8 * KIB, slots), slots)


def test_splits_end_the_scan_sooner_on_the_cores(spark, tmp_path):
    """One file more than cores, each under the ceiling: Spark's own split makes a task per file, so the
    last wave holds one task while the other cores idle. Under the settings Spark runs the tasks the
    model planned, smaller than the ceiling, and they end at least a quarter sooner."""
    slots = spark.sparkContext.defaultParallelism
    files = _files(tmp_path, [240 * KIB] * (slots + 1))
    with session_conf(spark, SMALL):
        assert _spark_tasks(spark, files) == slots + 1  # the companion: Spark's own half-empty wave
        settings = input_split_settings(spark, files, "csv")
        cap = int(settings[MAX_SPLIT_KEY])
        assert cap < 256 * KIB
        assert _span(spark, files, cap) <= 0.75 * _span(spark, files, 256 * KIB)
        with session_conf(spark, settings):
            tasks = _spark_tasks(spark, files)
    assert tasks == len(scan_tasks([f.size for f in files], [True] * len(files), cap, 8 * KIB, slots)) > slots + 1


def test_splits_are_left_to_spark_where_it_fills_the_waves_or_cannot_split(spark, tmp_path):
    slots = spark.sparkContext.defaultParallelism
    (tmp_path / "even").mkdir()
    (tmp_path / "odd").mkdir()
    even = _files(tmp_path / "even", [512 * KIB] * (slots // 2))  # 2 chunks of the ceiling each: one wave
    odd = _files(tmp_path / "odd", [240 * KIB] * (slots + 1))
    with session_conf(spark, SMALL):
        assert _spark_tasks(spark, even) == slots
        assert input_split_settings(spark, even, "csv") == {}
        assert input_split_settings(spark, odd, "csv")
        assert input_split_settings(spark, odd, "csv", multiline=True) == {}  # read file by file
        assert input_split_settings(spark, odd, "parquet") == {}  # splits at row groups
        packed = [File(path=f.path + ".gz", size=f.size) for f in odd]
        assert input_split_settings(spark, packed, "csv") == {}  # whole files: nothing to cut
    # never below four open costs a split, where a task's fixed cost is most of its work
    with session_conf(spark, {**SMALL, "spark.sql.files.openCostInBytes": str(64 * KIB)}):
        assert input_split_settings(spark, odd, "csv") == {}
