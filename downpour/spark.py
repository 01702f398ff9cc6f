"""The SparkSession: reuse the one a notebook or spark-submit gives us, else build a local one."""

from __future__ import annotations

import heapq
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from py4j.java_gateway import java_import
from py4j.protocol import Py4JError
from pyspark import SparkConf, SparkContext, StorageLevel
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import types as T

from downpour.config import Config
from downpour.errors import ConfigError
from downpour.logs import LOG

PERSIST_LEVEL_KEY = "spark.downpour.persistLevel"
PERSIST_COMPRESSED_KEY = "spark.downpour.persistCompressed"
CACHE_COMPRESSED_KEY = "spark.sql.inMemoryColumnarStorage.compressed"  # Spark's own; set per stage
CONSTRAINTS_KEY = "spark.sql.constraintPropagation.enabled"  # Spark's own; off while a stage runs
CODEGEN_FIELDS_KEY = "spark.sql.codegen.maxFields"  # Spark's own; raised around wide aggregations
_LEVELS = ("DISK_ONLY", "DISK_ONLY_2", "MEMORY_AND_DISK", "MEMORY_AND_DISK_2", "MEMORY_AND_DISK_DESER")


def get_spark(cfg: Config | None = None, master: str | None = None) -> SparkSession:
    """Return the active session if there is one (Databricks, spark-submit), else create one.

    The master comes from, in order: ``master``, ``cfg.spark.master``, ``DOWNPOUR_SPARK_MASTER``,
    then ``local[*]``. Settings in ``cfg.spark.conf`` are applied either way where Spark allows.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    master = master or (cfg.spark.master if cfg else None) or os.environ.get("DOWNPOUR_SPARK_MASTER")
    # Under spark-submit the JVM launched us (PYSPARK_GATEWAY_PORT is set) and owns the master, the
    # app name and every --conf: connect to it first so SparkConf() sees them, and never override them.
    submitted: SparkConf | None = None
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        SparkContext._ensure_initialized()
        submitted = SparkConf()
    builder = SparkSession.builder
    if submitted is None or not submitted.contains("spark.app.name") or (
            cfg is not None and "app_name" in cfg.spark.model_fields_set):
        builder = builder.appName(cfg.spark.app_name if cfg else "downpour")
    if master or submitted is None:
        builder = builder.master(master or "local[*]")
    defaults = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": "8",
        "spark.sql.adaptive.enabled": "true",
        "spark.ui.showConsoleProgress": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.driver.memory": os.environ.get("DOWNPOUR_DRIVER_MEMORY", "4g"),
    }
    effective = master or (submitted.get("spark.master", "") if submitted is not None else "") or "local[*]"
    if not effective.startswith("local"):
        # 8 shuffle partitions suit one machine; on a cluster keep Spark's default (200, coalesced by
        # AQE) so that large tables are not squeezed into a few huge partitions.
        defaults.pop("spark.sql.shuffle.partitions")
    if submitted is not None:
        defaults = {k: v for k, v in defaults.items() if not submitted.contains(k)}
    for k, v in {**defaults, **(cfg.spark.conf if cfg else {})}.items():
        builder = builder.config(k, str(v).lower() if isinstance(v, bool) else str(v))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("DOWNPOUR_SPARK_LOG_LEVEL", "WARN"))
    direct_function_lookup()
    return spark


def direct_function_lookup() -> None:
    """Let the driver's py4j view find Spark's ``functions`` class by its own import.

    Why: every ``pyspark.sql.functions`` call (``F.col``, ``F.when``, ...) first asks the JVM for the
    unqualified name ``functions``. py4j tries it as a class of the default package, then the view's
    single-class imports, then its wildcard packages in alphabetical order: ``java.lang`` and five of
    PySpark's (``org.apache.spark.api.java`` ... ``org.apache.spark.resource``) before
    ``org.apache.spark.sql``, seven failed class loads before the hit; with the import, one. A stage builds
    a few thousand expressions, one lookup each: the lookup took 0.30 ms without the import and 0.08-0.09 ms
    with it (benchmarks/README.md, "Investigation: a small run's fixed costs"). None of those packages has a
    class of that name, so the class found is the same. Idempotent; a no-op without a classic driver JVM
    (Spark Connect), and a py4j error here (a cluster that filters py4j calls) never stops a stage."""
    if SparkContext._active_spark_context is not None and SparkContext._jvm is not None:
        try:
            java_import(SparkContext._jvm, "org.apache.spark.sql.functions")
        except Py4JError as e:  # only a speed-up
            LOG.debug("spark: Spark's functions class not imported into the py4j view: %s", e)


_PACKED = (".gz", ".bz2", ".zst", ".zstd", ".lz4", ".snappy", ".deflate", ".xz")


def sized_partitions(spark: SparkSession, files: Sequence[Any], fmt: str) -> int:
    """How many partitions a frame persisted right after a shuffle keeps: one per advisory partition
    size (``spark.sql.adaptive.advisoryPartitionSizeInBytes``, 64 MiB by default) of the rows it holds,
    and a multiple of the default parallelism, so every core gets work in every wave.

    Why: AQE merges small shuffle partitions within a query, but not the output of a persisted frame,
    which keeps ``spark.sql.shuffle.partitions`` (200 on a cluster). Every later pass over it then
    ran 200 tasks, most of them near-empty for a small input. Coalescing to more
    partitions than the frame has is a no-op, so large inputs keep the session's partitioning.

    The rows are estimated from the input files (objects with a ``path`` and a ``size``): twice their
    bytes (the stages keep a raw copy beside the typed columns), four times for columnar or compressed
    files, which grow more once decoded. An underestimate only makes partitions larger than advised.
    The count is rounded up to a multiple of the cores, so the last wave of tasks is a full one.
    """
    packed = fmt.lower() not in ("csv", "json", "text")
    est = sum(f.size * (4 if packed or str(f.path).lower().endswith(_PACKED) else 2) for f in files)
    advisory = max(1, _byte_conf(spark, "spark.sql.adaptive.advisoryPartitionSizeInBytes", "64m"))
    slots = max(1, spark.sparkContext.defaultParallelism)
    return -(-max(1, -(-est // advisory)) // slots) * slots  # whole waves: 13 tasks on 2 cores idle one for a 14th


MAX_SPLIT_KEY = "spark.sql.files.maxPartitionBytes"  # Spark's own; set per stage by input_split_settings
_OPEN_COST_KEY = "spark.sql.files.openCostInBytes"
_SPLITTABLE = ("csv", "json", "text")


def _byte_conf(spark: SparkSession, key: str, default: str) -> int:
    text = spark.conf.get(key, None) or default
    return int(spark.sparkContext._jvm.org.apache.spark.network.util.JavaUtils.byteStringAsBytes(text))


def scan_tasks(sizes: Sequence[int], splittable: Sequence[bool], cap: int, open_cost: int, min_parts: int) -> list[int]:
    """The bytes each task of a file scan reads, as Spark 3.5 plans it (``FilePartition``): empty files
    dropped; a split size of ``cap`` (``maxPartitionBytes``) or less where the input spread over
    ``min_parts`` tasks is smaller; files cut into chunks of that size where they can be split; the chunks
    sorted largest first and packed into tasks of at most that size, each chunk counted with ``open_cost``."""
    files = [(s, split) for s, split in zip(sizes, splittable, strict=True) if s > 0]
    total = sum(s + open_cost for s, _ in files)
    max_split = min(cap, max(open_cost, total // max(1, min_parts)))
    chunks: list[int] = []
    for size, split in files:
        chunks += [min(max_split, size - o) for o in range(0, size, max_split)] if split else [size]
    tasks: list[int] = []
    current, held = 0, 0
    for c in sorted(chunks, reverse=True):
        if held and current + c > max_split:
            tasks.append(current)
            current, held = 0, 0
        current += c + open_cost
        held += 1
    return tasks + ([current] if held else [])


def _makespan(tasks: Sequence[int], slots: int) -> int:
    """When the last of ``tasks`` (bytes each, started in order as cores free up) ends on ``slots`` cores."""
    ends = [0] * max(1, min(slots, len(tasks)))
    for t in tasks:
        heapq.heapreplace(ends, ends[0] + t)
    return max(ends)


def input_split_settings(spark: SparkSession, files: Sequence[Any], fmt: str,
                         multiline: bool = False) -> dict[str, str]:
    """A ``spark.sql.files.maxPartitionBytes`` for a stage's file scans whose tasks over ``files`` (objects
    with a ``path`` and a ``size``) fill whole waves of the cores, or ``{}`` when Spark's own split does.

    Why: Spark cuts an input into splits of at most ``maxPartitionBytes`` (128 MiB), with no regard for the
    cores. 385 MB of CSV made 3 tasks on 2 cores, so the first pass over it (19 s of a 96 s ``prepare``)
    ran its last third on one core while the other idled; 4 tasks of about 98 MB took ``prepare``'s ingest
    step from 27-28 s to 22-23 s (benchmarks/README.md, "Investigation: input splits and the cores"). 51
    splits on 50 executor cores are the same case. Of the split sizes that make a whole number of waves
    (1 to 3 more than Spark's), up to the session's own ``maxPartitionBytes`` (a user's ceiling stays one),
    this takes the one whose tasks end soonest on ``defaultParallelism`` cores, planned as Spark plans them
    (:func:`scan_tasks`), where that is at least 5 % sooner than Spark's own split. Uncompressed text
    only: Parquet splits at row groups, which the file sizes do not show, and ``multiLine`` or compressed
    files are read whole (or, bzip2, as Hadoop splits them). Splits never go below 4 x
    ``openCostInBytes`` (16 MiB), where a task's fixed cost is most of it; a session that sets
    ``spark.sql.files.maxPartitionNum`` keeps Spark's own split.
    """
    if fmt.lower() not in _SPLITTABLE or multiline or not files:
        return {}
    if spark.conf.get("spark.sql.files.maxPartitionNum", None) or any(
            str(f.path).lower().endswith(_PACKED) for f in files):
        return {}
    slots = max(1, spark.sparkContext.defaultParallelism)
    ceiling = _byte_conf(spark, MAX_SPLIT_KEY, "128m")
    open_cost = _byte_conf(spark, _OPEN_COST_KEY, "4m")
    min_parts = int(spark.conf.get("spark.sql.files.minPartitionNum", None)
                    or spark.conf.get("spark.sql.leafNodeDefaultParallelism", None) or slots)
    sizes = [int(f.size) for f in files]
    splittable = [True] * len(sizes)
    total = sum(s + open_cost for s in sizes if s > 0)

    def makespan(cap: int) -> int:
        return _makespan(scan_tasks(sizes, splittable, cap, open_cost, min_parts), slots)

    own_tasks = scan_tasks(sizes, splittable, ceiling, open_cost, min_parts)
    spark_own = _makespan(own_tasks, slots)
    if spark_own <= 1.05 * -(-total // slots):
        return {}  # Spark's own split already ends within 5 % of the bytes per core
    best, best_cap = spark_own, ceiling
    waves = -(-len(own_tasks) // slots)
    for target in (w * slots for w in range(waves, waves + 3)):
        for stretch in (1.0, 1.01, 1.03):
            cap = int(total / target * stretch)
            if cap >= ceiling or cap < 4 * open_cost:
                continue
            span = makespan(cap)
            if span < best:
                best, best_cap = span, cap
    if best_cap == ceiling or best > 0.95 * spark_own:
        return {}
    LOG.info("input splits: %d bytes each (not %d): the scan's tasks fill whole waves of %d cores",
             best_cap, ceiling, slots)
    return {MAX_SPLIT_KEY: str(best_cap)}


def persist_level(spark: SparkSession) -> StorageLevel:
    """The storage level of the frames a stage persists: ``DISK_ONLY`` unless
    ``spark.downpour.persistLevel`` says otherwise.

    Why not ``MEMORY_AND_DISK``: it builds each cached block whole in the heap, and reads a spilled
    block back into one heap buffer; with partitions of a few hundred MB that ran a 10M-row local
    ``prepare`` out of a 4 GiB heap. ``DISK_ONLY`` streams both ways, and the OS page cache keeps recently
    written blocks in RAM. Executors with heap to spare can set ``MEMORY_AND_DISK``.
    """
    name = (spark.conf.get(PERSIST_LEVEL_KEY, None) or "DISK_ONLY").strip().upper()
    if name not in _LEVELS:
        raise ConfigError(f"spark.conf.{PERSIST_LEVEL_KEY}: unknown storage level {name!r}; use one of {list(_LEVELS)}")
    return getattr(StorageLevel, name)


def persist_compressed(spark: SparkSession) -> bool:
    """Whether a stage leaves Spark's columnar cache compression as the session has it:
    ``spark.downpour.persistCompressed`` (false by default; a ConfigError naming the key if not a boolean)."""
    text = (spark.conf.get(PERSIST_COMPRESSED_KEY, None) or "false").strip().lower()
    if text not in ("true", "false"):
        raise ConfigError(f"spark.conf.{PERSIST_COMPRESSED_KEY}: {text!r} is not true or false")
    return text == "true"


class Persisted:
    """The frames one stage persists, all at the stage's storage level: whatever the stage still holds
    when it ends, also when it fails (even in the first action over a frame), is released then.

    Why the stage owns them: a frame persisted by a step that then raised never reached the caller's
    cleanup, so each failed run in a long-lived session (a notebook, a scheduler's driver) left its
    blocks on the executors' disks.
    """

    def __init__(self, level: StorageLevel) -> None:
        self.level = level
        self._held: list[DataFrame] = []

    def persist(self, df: DataFrame) -> DataFrame:
        """``df`` persisted at the stage's level and held until :meth:`release` or the stage's end."""
        out = df.persist(self.level)
        self._held.append(out)
        return out

    def release(self, *frames: DataFrame) -> None:
        """Unpersist ``frames`` now (the stage no longer reads them)."""
        for df in frames:
            df.unpersist()
            self._held = [h for h in self._held if h is not df]

    @property
    def held(self) -> int:
        return len(self._held)

    def _release_all(self) -> None:
        """Unpersist every held frame; one that fails (a stopped SparkContext) is logged, so the others
        are still released and the stage's own error is the one that propagates."""
        while self._held:
            df = self._held.pop()
            try:
                df.unpersist()
            except Exception as e:  # noqa: BLE001 - cleanup must not mask the stage's outcome
                LOG.warning("persisted frame not released: %s", e)


@contextmanager
def persisting(spark: SparkSession) -> Iterator[Persisted]:
    """The scope of a stage that persists frames; yields the :class:`Persisted` that holds them and
    releases what is left at the end. Both persistence keys are validated on entry (before any Spark
    work), and with a disk-only ``persist_level`` Spark's columnar cache compression
    (``spark.sql.inMemoryColumnarStorage.compressed``) is off until the stage ends, when the session's
    own setting (or its absence) comes back. ``spark.downpour.persistCompressed=true`` leaves the
    session's setting alone, and so do memory levels, whose compressed blocks are what fits the heap.
    The optimizer's constraint propagation (``spark.sql.constraintPropagation.enabled``) is off in the
    same scope, and comes back alike.

    Why off: a cached block's columnar compression tries a dictionary for every string column of every
    10,000-row batch, hashing each value into a growing map, and the persisted frames are mostly unique
    strings (ids, timestamps, the raw JSON) that no dictionary shrinks: a sampled JVM profile of
    ``score``'s ingest pass found a large share of its time there (benchmarks/README.md, "Investigation:
    the columnar cache's compression"). ``DISK_ONLY`` blocks land in the OS page cache, so the larger
    blocks cost little. Spark reads the setting when a cache's buffers are first built (the stage's first
    action over it; a copy taken at ``persist`` when ``spark.sql.optimizer.canChangeCachedPlanOutputPartitioning``
    is false), hence a scope around the whole stage. The setting is the session's: stages run
    concurrently on one session (notebook threads) share it.

    Why constraint propagation off: it infers every predicate that holds below each node of a plan by
    substituting each alias into each known predicate, and the window features' hot-key path (a frame
    reused in a union and in joins per entity, dozens of derived columns) made that grow with every
    input column: with hot keys in both entities of 200,000 fraud rows, planning the windows took 3.5 s
    at 7 input columns, 12 s at 11, and at 16 had not finished when stopped about 225 s in (another
    run's driver ran out of heap); 1.6 s without it (benchmarks/README.md, "Investigation: planning the hot-key path").
    """
    direct_function_lookup()  # a notebook's or spark-submit's session too
    level = persist_level(spark)
    keep = persist_compressed(spark) or level.useMemory  # then the session's own setting applies
    stage = Persisted(level)
    with session_conf(spark, {CONSTRAINTS_KEY: "false", **({} if keep else {CACHE_COMPRESSED_KEY: "false"})}):
        try:
            yield stage
        finally:
            stage._release_all()


@contextmanager
def session_conf(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Runtime settings for the actions run inside the block; each key's earlier value (or its absence)
    comes back afterwards, also when the block raises."""
    before = {k: spark.conf.get(k, None) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)


@contextmanager
def codegen_fields(spark: SparkSession, fields: int) -> Iterator[None]:
    """Whole-stage code generation for the actions in the block, over schemas of up to ``fields`` fields.

    Why: Spark compiles no operator whose input or output has more (nested) fields than
    ``spark.sql.codegen.maxFields`` (100 by default) into whole-stage code, and says nothing. A global
    aggregation's output holds a field per value and its partial buffers one to a few per value, so the
    fits' shared passes (103 values for conf/fraud.yaml) ran on the interpreted path, 0.7-3.9 s slower
    once warm at 2,000,000 rows (benchmarks/README.md, "Investigation: the feature fit against a scan of its
    rows"). The limit is raised for the block only; the session's own setting comes back after it, and a
    higher one is left alone. Like ``session_conf``, the setting is the session's: a query another thread
    runs on it meanwhile sees the raised limit, and where two such blocks overlap on one session, the one
    that ends first restores the limit under the other's action, which may then run uncompiled."""
    if int(spark.conf.get(CODEGEN_FIELDS_KEY)) >= fields:  # the effective limit: Spark's default if unset
        yield
        return
    with session_conf(spark, {CODEGEN_FIELDS_KEY: str(fields)}):
        yield


def aggregation_fields(df: DataFrame, values: int) -> int:
    """A bound on the fields of each operator of a global aggregation of ``values`` over ``df``: the frame's
    fields, counted as Spark counts them (the leaves of structs, arrays and maps), and four per value, the
    most a partial buffer of ours holds (count, sum of integers, min, max: one; avg: two; stddev: three).
    A decimal sum holds two, so the bound stays above it too."""
    return _leaf_fields(df.schema) + 4 * values


def aggregate_row(df: DataFrame, aggs: Sequence[Column]) -> Row:
    """The one row of the global aggregation ``aggs`` over ``df``, run inside :func:`codegen_fields`."""
    with codegen_fields(df.sparkSession, aggregation_fields(df, len(aggs))):
        return df.agg(*aggs).first()


def _leaf_fields(dtype: T.DataType) -> int:
    if isinstance(dtype, T.UserDefinedType):
        return _leaf_fields(dtype.sqlType())
    if isinstance(dtype, T.StructType):
        return sum(_leaf_fields(f.dataType) for f in dtype.fields)
    if isinstance(dtype, T.ArrayType):
        return _leaf_fields(dtype.elementType)
    if isinstance(dtype, T.MapType):
        return _leaf_fields(dtype.keyType) + _leaf_fields(dtype.valueType)
    return 1
