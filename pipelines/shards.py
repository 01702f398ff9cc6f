"""Parquet shards that give every Horovod worker an equal share, byte-identical run after run.

petastorm hands whole row groups to workers, so balance is a row-group property. For a split of
``n`` rows we plan ``G >= shards.min_row_groups_per_worker * training.workers`` row groups of exactly
``R`` rows (``R <= shards.row_group_rows``), only the last one smaller, and write each as its own
file holding exactly one row group. All splits are written by one Spark job:

1. every row gets a deterministic position in its split: rows are spread over 4096 buckets by
   ``xxhash64(seed, row_id)``, one grouped count gives each (split, bucket) its offset, and a window
   numbers the rows inside a bucket by (hash, row_id, every other column) -- a total order, so the same
   data always gets the same positions, whatever the partitioning or cluster size;
2. ``group = position // R``; rows are repartitioned by group (a task holds whole groups, several
   of them), sorted by (group, position) and written with ``partitionBy(split, group)`` and a
   ``parquet.block.size`` far above any row group, so each group becomes exactly one file with exactly
   one row group, whatever the number of tasks;
3. each file is moved to ``<split>/part-<group>.parquet``: the name comes from the data, not from
   Spark's task numbers or job UUID.

The hash order also shuffles rows across row groups, so each row group is a random sample of its
split. The footers are read back (pyarrow) with a SHA-256 per file; ``check_balance`` fails the run
if a split came out other than planned.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import reduce
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from downpour.config import Config
from downpour.logs import LOG
from downpour.pipelines.parquet_footer import canonicalize, canonicalize_file
from downpour.storage import HadoopFS, join, local_path
from downpour.storage import is_file_url as is_local

BUCKETS = 4096
MAX_RATIO = 1.25
_BLOCK_BYTES = 1 << 40  # "never flush a row group early": a file's rows form one row group
_H, _B, _IDX, _S, _GID, _OFF = "_dp_h", "_dp_b", "_dp_idx", "_dp_split", "_dp_gid", "_dp_off"
_SPLIT_NAME = "_dp_split_name"
_CODECS = {"none": "uncompressed", "snappy": "snappy", "zstd": "zstd", "gzip": "gzip"}
_TMP = "_dp_shards_tmp"
_WRITTEN = re.compile(rf"/{_S}=(\d+)/{_GID}=(\d+)/[^/]+\.parquet$")


@dataclass(frozen=True)
class ShardPlan:
    rows: int
    rows_per_group: int
    groups: int
    min_groups: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def plan_row_groups(rows: int, target_rows: int, min_groups: int) -> ShardPlan:
    """Equal row groups of at most ``target_rows`` rows, at least ``min_groups`` of them, last smaller.

    With fewer rows than ``min_groups`` every row is its own group (and some workers get nothing).
    """
    if rows <= 0:
        return ShardPlan(0, 0, 0, min_groups)
    groups = max(min_groups, math.ceil(rows / target_rows))
    per = max(1, math.ceil(rows / groups))
    while per > 1 and math.ceil(rows / per) < min(min_groups, rows):
        per -= 1
    return ShardPlan(rows, per, math.ceil(rows / per), min_groups)


def min_row_groups(cfg: Config) -> int:
    return cfg.shards.min_row_groups_per_worker * cfg.training.workers


def writer_options(cfg: Config) -> dict[str, str]:
    return {
        "compression": _CODECS[cfg.shards.compression],
        "parquet.block.size": str(_BLOCK_BYTES),
        "maxRecordsPerFile": "0",  # never split a group over files, whatever the session says
        "mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
    }


def write_shards(frames: Mapping[str, DataFrame], base_url: str, cfg: Config, seed: int,
                 partitions: int | None = None) -> dict[str, tuple[ShardPlan, list[dict[str, Any]]]]:
    """:func:`write_split_shards` for one frame per split (same model-ready columns incl. ``row_id``)."""
    names = list(frames)
    columns = frames[names[0]].columns
    union = reduce(DataFrame.unionByName,
                   [frames[n].select(*columns).withColumn(_SPLIT_NAME, F.lit(n)) for n in names])
    return write_split_shards(union, _SPLIT_NAME, names, base_url, cfg, seed, partitions)


def write_split_shards(df: DataFrame, split_column: str, names: list[str], base_url: str, cfg: Config, seed: int,
                       partitions: int | None = None) -> dict[str, tuple[ShardPlan, list[dict[str, Any]]]]:
    """Write the rows of ``df`` (model-ready columns incl. ``row_id``) to ``<base_url>/<split>/`` by their
    ``split_column`` (one of ``names``; the column itself is not written) as balanced, deterministic
    Parquet, reading ``df`` once for all splits; returns per split the plan and the files as written.
    ``base_url`` must be qualified (``file:/x``, ``hdfs://...``): a bare path is taken as local.
    ``partitions`` (``downpour.spark.sized_partitions``) caps the partitions of ``df``."""
    columns = [c for c in df.columns if c != split_column]
    index = F.raise_error(F.concat(F.lit(f"shards: a row's {split_column} is none of {names}: "),
                                   F.coalesce(F.col(split_column).cast("string"), F.lit("null"))))
    for i, name in enumerate(names):
        index = F.when(F.col(split_column) == name, F.lit(i)).otherwise(index)
    union = df.withColumn(_S, index).drop(split_column)
    if partitions is not None:
        union = union.coalesce(partitions)
    # Not persisted: the count per bucket reads only the split and row_id (column pruning drops the
    # per-row feature expressions and the Python UDF from that job; only large-vocabulary broadcast
    # joins stay), so materialising every model-ready row once more would cost a full write and read.
    plans = _write(union, base_url, names, columns, cfg, seed)
    spark = union.sparkSession
    out = {}
    for i, name in enumerate(names):
        url = join(base_url, name)
        if plans[name].rows == 0:  # an empty split still gets its schema (one file, no row group)
            union.where(F.col(_S) == i).select(*columns).limit(0).coalesce(1) \
                .write.options(**writer_options(cfg)).parquet(url)
            _rename_only_file(spark, url)
        out[name] = (plans[name], inspect_shards(spark, url))
    return out


def _write(df: DataFrame, base_url: str, names: list[str], columns: list[str], cfg: Config,
           seed: int) -> dict[str, ShardPlan]:
    keyed = df.withColumn(_H, F.xxhash64(F.lit(seed), F.col("row_id")))
    keyed = keyed.withColumn(_B, F.pmod(F.col(_H), F.lit(BUCKETS)))
    counts: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(names))}
    for r in keyed.groupBy(_S, _B).count().collect():
        counts[int(r[_S])].append((int(r[_B]), int(r["count"])))
    plans: dict[str, ShardPlan] = {}
    offsets: list[tuple[int, int, int]] = []
    group_base: dict[int, int] = {}
    total_groups = 0
    for i, name in enumerate(names):
        acc = 0
        for b, c in sorted(counts[i]):
            offsets.append((i, b, acc))
            acc += c
        plans[name] = plan = plan_row_groups(acc, cfg.shards.row_group_rows, min_row_groups(cfg))
        if 0 < acc < plan.min_groups:
            LOG.warning("shards: split %s has %d rows, fewer than the %d row groups the workers need",
                        name, acc, plan.min_groups)
        group_base[i] = total_groups
        total_groups += plan.groups
    if total_groups == 0:
        return plans

    off = F.broadcast(df.sparkSession.createDataFrame(offsets, f"{_S} int, {_B} long, {_OFF} long"))
    others = sorted(c for c in columns if c != "row_id")
    w = Window.partitionBy(_S, _B).orderBy(F.col(_H), F.col("row_id"), *[F.col(c) for c in others])
    idx = F.col(_OFF) + F.row_number().over(w) - 1
    per_split = {i: plans[n].rows_per_group for i, n in enumerate(names) if plans[n].rows}
    gid = _by_split(group_base) + F.floor(F.col(_IDX) / _by_split(per_split)).cast("long")
    # A task writes one file per group it holds (sorted by group, then position): fewer tasks than
    # groups, since each task costs a writer and a commit, which a small split's tiny groups would not repay.
    tasks = min(total_groups, _write_tasks(df.sparkSession, total_groups))
    rows = (keyed.join(off, [_S, _B]).withColumn(_IDX, idx).withColumn(_GID, gid)
            .repartition(tasks, _GID).sortWithinPartitions(_S, _GID, _IDX).select(*columns, _S, _GID))
    tmp = join(base_url, _TMP)
    rows.write.options(**writer_options(cfg)).partitionBy(_S, _GID).parquet(tmp)
    _move_groups(df.sparkSession, tmp, base_url, names, group_base, plans)
    return plans


def _write_tasks(spark: SparkSession, groups: int) -> int:
    """The session's shuffle partitions; one task per group when that is not a number (Databricks'
    ``auto``). The bytes do not depend on it: each group is one file, written by one task."""
    try:
        return max(1, int(spark.conf.get("spark.sql.shuffle.partitions", "200") or 200))
    except ValueError:
        return groups


def _by_split(values: Mapping[int, int]) -> Column:
    expr = F.lit(None).cast("long")
    for i, v in values.items():
        expr = F.when(F.col(_S) == i, F.lit(v)).otherwise(expr)
    return expr


def _move_groups(spark: SparkSession, tmp: str, base_url: str, names: list[str], group_base: dict[int, int],
                 plans: dict[str, ShardPlan]) -> None:
    """``<tmp>/_dp_split=i/_dp_gid=g/part-*.parquet`` -> ``<base>/<split i>/part-<g - base_i>.parquet``."""
    fs = HadoopFS(spark)
    moves: dict[str, str] = {}
    seen: set[str] = set()
    for path in _written_files(fs, tmp):
        m = _WRITTEN.search(path)
        if not m:
            continue
        i, g = int(m.group(1)), int(m.group(2))
        dest = join(base_url, names[i], f"part-{g - group_base[i]:05d}.parquet")
        if dest in seen:
            raise RuntimeError(f"shards: row group {g} of {names[i]} was written to more than one file")
        seen.add(dest)
        moves[path] = dest
    local = is_local(tmp) and is_local(base_url)
    for name in names:
        if not plans[name].rows:
            continue
        if local:
            os.makedirs(local_path(join(base_url, name)), exist_ok=True)
        else:
            fs.mkdirs(join(base_url, name))
    for src, dest in moves.items():
        if local:
            os.rename(local_path(src), local_path(dest))
        else:
            fs.rename(src, dest)
    fs.delete(tmp, recursive=True)


def _written_files(fs: HadoopFS, tmp: str) -> list[str]:
    """The data files under ``tmp``: local directories walked directly (a Hadoop listing costs a JVM
    round trip per file), anything else through Hadoop."""
    if not is_local(tmp):
        return [f.path for f in fs.list_files(tmp)]
    out = []
    for d, dirs, files in os.walk(local_path(tmp)):
        dirs[:] = [x for x in dirs if "=" in x or not x.startswith(("_", "."))]  # Spark's hidden rule
        out += [os.path.join(d, n) for n in files if not n.startswith((".", "_"))]
    return sorted(out)


def _rename_only_file(spark: SparkSession, url: str) -> None:
    fs = HadoopFS(spark)
    parts = sorted(n for n, is_dir, _ in fs.list_dir(url) if not is_dir and n.endswith(".parquet"))
    for i, name in enumerate(parts):
        fs.rename(join(url, name), join(url, f"part-{i:05d}.parquet"))


# ---- reading back -----------------------------------------------------------------------------------
def _describe(name: str, data: bytes) -> dict[str, Any]:
    import io

    import pyarrow.parquet as pq

    md = pq.ParquetFile(io.BytesIO(data)).metadata
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "rows": md.num_rows, "row_groups": [md.row_group(i).num_rows for i in range(md.num_row_groups)]}


def inspect_shards(spark: SparkSession, url: str) -> list[dict[str, Any]]:
    """Per file: name, bytes, sha256, rows and rows per row group, from the Parquet footers.

    Local directories are read on the driver, and each file's footer is made canonical in place
    (``pipelines/parquet_footer.py``: the JVM lists a column's encodings in arbitrary order), so the
    same data gives the same bytes in any Spark process. Anything else is read with one Spark job
    (``binaryFiles``), so the bytes never travel through the driver; there files are not rewritten
    and the checksum is that of the canonical form (what the file would be after the rewrite).
    """
    if is_local(url):
        base = local_path(url)
        out = []
        for name in sorted(os.listdir(base)):
            if name.endswith(".parquet") and not name.startswith((".", "_")):
                out.append(_describe(name, canonicalize_file(os.path.join(base, name))))
        return out
    return inspect_shards_distributed(spark, url)


def inspect_shards_distributed(spark: SparkSession, url: str) -> list[dict[str, Any]]:
    """The same description computed in executors (any Hadoop URL)."""
    rdd = spark.sparkContext.binaryFiles(join(url, "*.parquet"))
    rows = rdd.map(lambda kv: _describe(kv[0].rstrip("/").rsplit("/", 1)[-1], canonicalize(bytes(kv[1])))).collect()
    return sorted(rows, key=lambda r: r["file"])


def summarize(files: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest entry of one split's shards."""
    groups = [g for f in files for g in f["row_groups"]]
    return {
        "files": len(files),
        "row_groups": len(groups),
        "shard_rows": sum(f["rows"] for f in files),
        "bytes": sum(f["bytes"] for f in files),
        "row_group_rows_min": min(groups) if groups else 0,
        "row_group_rows_max": max(groups) if groups else 0,
        "checksums": {f["file"]: f["sha256"] for f in files},
    }


def check_balance(files: list[dict[str, Any]], plan: ShardPlan, where: str) -> float:
    """Row groups as planned, and largest / smallest <= 1.25 with the last (smallest) one excepted."""
    groups = [g for f in files for g in f["row_groups"]]
    if sum(groups) != plan.rows:
        raise RuntimeError(f"shards {where}: {sum(groups)} rows in the files, {plan.rows} planned")
    if len(groups) != plan.groups:
        raise RuntimeError(f"shards {where}: {len(groups)} row groups written, {plan.groups} planned")
    if len(groups) < 2:
        return 1.0
    body = sorted(groups)[1:]
    ratio = body[-1] / body[0]
    if ratio > MAX_RATIO:
        raise RuntimeError(f"shards {where}: row groups unbalanced (largest/smallest {ratio:.3f} > {MAX_RATIO})")
    return ratio


