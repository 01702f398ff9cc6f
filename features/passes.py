"""Passes over the train rows that several fits share: one global aggregation and one grouped count.

prepare fits the feature state and the drift reference on the same train rows. Each wants a global
aggregation (row and null counts, fixed-point sums, decile bin counts) and the most frequent values of
some columns under one vocabulary rule. Run apart, that is four Spark actions; on a small split each
costs more in planning and job overhead than in counting (benchmarks/README.md, "Investigation: a
small run's fixed costs"). Each fit adds what it wants to one :class:`Passes`, the caller runs it once,
and each fit reads its own results from the :class:`Counted` it returns: two actions in all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Row, Window
from pyspark.sql import functions as F

from downpour.logs import timed
from downpour.spark import aggregation_fields, codegen_fields


@dataclass(frozen=True)
class TopValues:
    """The non-null values of ``value`` seen at least ``min_count`` times, the ``top_k`` most frequent
    (ties broken by the value): the vocabulary rule, kept in this one place."""

    key: str
    value: Column  # a string column
    min_count: int
    top_k: int


@dataclass(frozen=True)
class Counted:
    """What :meth:`Passes.run` found: the global aggregation's row and, per :class:`TopValues` key, its
    values, most frequent first."""

    row: Row | None
    tops: dict[str, list[str]]


class Passes:
    """Aggregations and value counts collected from several fits, run over one frame in two actions."""

    def __init__(self) -> None:
        self._columns: dict[str, Column] = {}
        self._aggs: list[Column] = []
        self._tops: dict[str, TopValues] = {}

    def columns(self, columns: Mapping[str, Column]) -> None:
        """Per-row columns the aggregations read, computed once per row (an expression read by several
        aggregations is otherwise planned and evaluated once per reader)."""
        for name, col in columns.items():
            if name in self._columns:
                raise ValueError(f"passes: column {name!r} is added twice")
            self._columns[name] = col

    def aggregate(self, *aggs: Column) -> None:
        """Global aggregations, each aliased with a name unique among all the fits' aggregations."""
        self._aggs += aggs

    def top_values(self, *items: TopValues) -> None:
        for item in items:
            if item.key in self._tops:
                raise ValueError(f"passes: top values of {item.key!r} are asked for twice")
            self._tops[item.key] = item

    def run(self, df: DataFrame) -> Counted:
        """One action for the aggregations (if any), one for the value counts (if any)."""
        row = None
        if self._aggs:
            wide = df.withColumns(self._columns)
            agg = wide.agg(*self._aggs)
            names = agg.columns
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:  # a Row would answer the first of two fields of one name: two fits' results mixed up
                raise ValueError(f"passes: two aggregations are named {dup[0]!r}")
            with (timed(f"train passes: one aggregation of {len(self._aggs)} values"),
                  codegen_fields(df.sparkSession, aggregation_fields(wide, len(self._aggs)))):
                row = agg.first()
        return Counted(row, _top_values(df, list(self._tops.values())))


def _top_values(df: DataFrame, items: list[TopValues]) -> dict[str, list[str]]:
    """The values of every item from ONE grouped pass over exploded (item, value) pairs."""
    if not items:
        return {}
    pairs = F.explode(F.array(*[F.struct(F.lit(i).alias("i"), it.value.cast("string").alias("v"))
                                for i, it in enumerate(items)]))
    top_k = F.lit(None).cast("long")
    min_count = F.lit(None).cast("long")
    for i, it in enumerate(items):
        top_k = F.when(F.col("i") == i, F.lit(it.top_k)).otherwise(top_k)
        min_count = F.when(F.col("i") == i, F.lit(it.min_count)).otherwise(min_count)
    rank = F.row_number().over(Window.partitionBy("i").orderBy(F.desc("count"), F.asc("v")))
    # the literal bound lets Spark limit each partition's ranks before the window (a window group limit);
    # the per-item bound alone is an expression it cannot push down
    max_k = max(it.top_k for it in items)
    with timed(f"train passes: the most frequent values of {len(items)} columns"):
        rows = (
            df.select(pairs.alias("p")).select("p.i", "p.v").where(F.col("v").isNotNull())
            .groupBy("i", "v").count().where(F.col("count") >= min_count)
            .withColumn("r", rank).where((F.col("r") <= max_k) & (F.col("r") <= top_k))
            .select("i", "v", "r").collect()
        )
    out: dict[str, list[tuple[int, str]]] = {it.key: [] for it in items}
    for r in rows:
        out[items[r["i"]].key].append((r["r"], r["v"]))
    return {key: [v for _, v in sorted(got)] for key, got in out.items()}
