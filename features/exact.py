"""Quantiles and moments that depend on the rows alone, never on their order or partitioning.

Why: Spark's ``approxQuantile`` builds a Greenwald-Khanna summary per partition and merges the summaries
in the order the tasks end, and ``avg`` / ``stddev_pop`` add floating-point numbers in the order the rows
arrive. Above some ten thousand rows both move with the partitioning: 2,000,000 fraud rows whose windows
were sorted another way fitted other medians (40.24 against 40.23) and means that differ in the last
digits, so the feature state and every shard built from it changed (benchmarks/README.md, "Investigation:
the fit and the partitioning"). Here every partial result is an integer (a count, a sum of fixed-point
integers) or a min / max, and those combine to the same result in any order.

- :func:`quantiles`: the k-th smallest value, exactly (k = max(1, ceil(p * n)): the lower quantile), found
  by counting the values per bin of their binary form (sign, exponent, leading mantissa bits), then, only
  in a wanted bin that holds more than one value, per value: one or two passes whose groups are bins.
- :func:`sum_parts` / :func:`fixed_sum`: a sum of doubles as a sum of integers: each value scaled by a power
  of two that fits the column's largest magnitude into 51 bits, rounded to an integer, and split into two
  longs that cannot overflow below about 10^11 rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

_BITS = 8  # leading mantissa bits of the first pass's bins: 256 bins per power of two at most
_INF = 1 << 62
_SPLIT = 26  # a fixed-point integer m = hi * 2^26 + lo, 0 <= lo < 2^26


def _binned(values: DataFrame) -> DataFrame:
    """``values`` (``i``, ``x``: non-NaN doubles) plus ``b``: an integer that orders like ``x`` up to its
    leading ``_BITS`` mantissa bits.

    Computed in three projections, each column once per value: a bin written as one expression would repeat
    the exponent's ``log2`` and ``pow`` in every branch that reads it (Spark eliminates no common
    subexpression inside a ``CASE`` branch), and those were most of the first pass's CPU. Spark does not
    merge a projection into the next when that repeats a costly column, so each stays computed once. ``b``
    is declared non-null (it is never null for a non-NaN ``x``): a join on it would otherwise get an
    inferred null check pushed below the projections, with the whole expression written into it."""
    x = F.col("x")
    a = F.abs(x)
    # log2 may round across a power of two: e1 is the exponent give or take one, kept within [-1074, 1023]
    # (log2 of the largest doubles rounds to 1024, and 2^1024 and 2^-1075 are no doubles), so r = |x| / 2^e1
    # is exact and never null
    e1 = F.least(F.greatest(F.floor(F.log2(a)), F.lit(-1074)), F.lit(1023))
    with_e1 = values.select("i", "x", e1.alias("e1"))
    with_r = with_e1.select("i", "x", "e1", (a / F.pow(F.lit(2.0), F.col("e1"))).alias("r"))
    r = F.col("r")
    e = F.when(r >= 2, F.col("e1") + 1).when(r < 1, F.col("e1") - 1).otherwise(F.col("e1"))
    frac = F.when(r >= 2, r * 0.5).when(r < 1, r * 2.0).otherwise(r) - F.lit(1.0)  # |x| / 2^e - 1, exact: [0, 1)
    mag = (e.cast("long") + F.lit(1075)) * F.lit(1 << _BITS) + F.floor(frac * F.lit(float(1 << _BITS))).cast("long") + 1
    b = (F.when(x == 0, F.lit(0).cast("long"))
         .when(x == float("inf"), F.lit(_INF)).when(x == float("-inf"), F.lit(-_INF))
         .when(x > 0, mag).otherwise(-mag))
    return with_r.select("i", "x", F.coalesce(b, F.lit(0).cast("long")).alias("b"))


def _rank(p: float, n: Column) -> Column:
    """The 1-based rank of the lower quantile p among n values: max(1, ceil(p * n)), capped at n."""
    return F.least(F.greatest(F.lit(1).cast("long"), F.ceil(F.lit(p) * n)), n)


def _cumulative(groups: DataFrame, part: list[str], order: str) -> DataFrame:
    """``groups`` (``n`` values each) with ``cum``: the values of their partition ``part`` up to and
    including them, taken in ``order``."""
    w = Window.partitionBy(*part).orderBy(order).rowsBetween(Window.unboundedPreceding, 0)
    return groups.withColumn("cum", F.sum("n").over(w))


def _holding(cum: DataFrame) -> DataFrame:
    """The rows of a :func:`_cumulative` frame whose group holds their wanted rank ``k``."""
    return cum.where((F.col("cum") - F.col("n") < F.col("k")) & (F.col("k") <= F.col("cum")))


def quantiles(df: DataFrame, columns: Mapping[str, Column], probs: Sequence[float]) -> dict[str, list[float] | None]:
    """``{key: [the exact lower quantile of the column at each of probs]}`` over the non-null, non-NaN
    values of each column (None for a column without one).

    Pass 1 counts the values per (column, bin of 8 mantissa bits) with each bin's min and max, and keeps,
    with a window over each column's bins, only the bins that hold a wanted rank: where that rank is the
    bin's first or last value, or the bin holds one value, its min or max is the answer. Pass 2, only for
    the other wanted bins, counts those bins' values one by one the same way. Only the wanted rows reach the
    driver."""
    keys = list(columns)
    if not keys:
        return {}
    exprs = list(columns.values())
    groups = (_binned(_values(df, exprs, range(len(exprs)))).groupBy("i", "b")
              .agg(F.count(F.lit(1)).alias("n"), F.min("x").alias("lo"), F.max("x").alias("hi")))
    groups = groups.withColumn("total", F.sum("n").over(Window.partitionBy("i")))
    wanted_ranks = F.explode(F.array(*[F.struct(F.lit(j).alias("t"), _rank(p, F.col("total")).alias("k"))
                                       for j, p in enumerate(probs)])).alias("w")
    ranked = _cumulative(groups, ["i"], "b").select("*", wanted_ranks).select("*", "w.t", "w.k")
    hits = _holding(ranked).select("i", "b", "n", "lo", "hi", "cum", "total", "t", "k").collect()
    found: dict[tuple[int, int], float] = {}
    counts: dict[int, int] = {}
    deeper: list[tuple[int, int, int, int]] = []  # (column, bin, target, rank within the bin)
    for r in hits:
        i, t = int(r["i"]), int(r["t"])
        counts[i] = int(r["total"])
        local = int(r["k"]) - (int(r["cum"]) - int(r["n"]))
        if r["lo"] == r["hi"] or local == 1:
            found[(i, t)] = float(r["lo"])
        elif local == int(r["n"]):
            found[(i, t)] = float(r["hi"])
        else:
            deeper.append((i, int(r["b"]), t, local))
    if deeper:
        for r in _holding(_cumulative(_inside(df, exprs, deeper), ["i", "t"], "x")).collect():
            found[(int(r["i"]), int(r["t"]))] = float(r["x"])
    return {key: [found[(i, j)] for j in range(len(probs))] if counts.get(i) else None
            for i, key in enumerate(keys)}


def _inside(df: DataFrame, exprs: list[Column], deeper: list[tuple[int, int, int, int]]) -> DataFrame:
    """Pass 2's counts: (i, t, k, x, n) for every distinct value ``x`` of the bins ``deeper`` names
    ((column, bin, target, rank within the bin)), once per target in that bin. An equi-join on the bin: a
    value meets only its own bin's targets (the bins order like the values)."""
    wanted = df.sparkSession.createDataFrame(deeper, "i int, b long, t int, k long")
    return (_binned(_values(df, exprs, sorted({d[0] for d in deeper})))
            .join(F.broadcast(wanted), ["i", "b"])
            .groupBy("i", "t", "k", "x").agg(F.count(F.lit(1)).alias("n")))


Table = dict[str, dict[float, float] | None]  # {key: {p: the exact lower quantile}}, None: no value


def table(df: DataFrame, *wanted: Mapping[str, Iterable[float]]) -> Table:
    """:func:`quantiles` of the columns of ``df`` that the ``wanted`` maps name, at every probability they
    name, computed in one go for the fits that read them (prepare's feature state and drift reference:
    the passes scan the train rows once instead of once per fit)."""
    keys = list(dict.fromkeys(key for w in wanted for key in w))
    probs = sorted({float(p) for w in wanted for ps in w.values() for p in ps})
    if not probs:
        return {}  # nothing wanted: an empty table (None would say "no value" to quantiles_of)
    qs = quantiles(df, {key: F.col(key) for key in keys}, probs)
    return {key: dict(zip(probs, values, strict=True)) if values else None for key, values in qs.items()}


def quantiles_of(known: Table | None, df: DataFrame, columns: Mapping[str, Column],
                 probs: Sequence[float]) -> dict[str, list[float] | None]:
    """:func:`quantiles`, read from ``known`` (a :func:`table` of the same rows) where it holds every
    column at every probability, computed otherwise."""
    def held(key: str) -> bool:
        got = known[key] if known is not None and key in known else {}
        return got is None or (bool(got) and all(float(p) in got for p in probs))

    if not all(held(key) for key in columns):
        return quantiles(df, columns, probs)
    return {key: None if known[key] is None else [known[key][float(p)] for p in probs]  # type: ignore[index]
            for key in columns}


def _values(df: DataFrame, exprs: list[Column], which: Sequence[int]) -> DataFrame:
    """(i, x): the non-null, non-NaN values of the columns ``which`` (indexes into ``exprs``), stacked."""
    pairs = F.explode(F.array(*[F.struct(F.lit(i).alias("i"), exprs[i].cast("double").alias("x")) for i in which]))
    x = F.when(F.col("p.x") == 0, F.lit(0.0)).otherwise(F.col("p.x"))  # -0.0 is 0.0: min / max keep either
    return df.select(pairs.alias("p")).select("p.i", x.alias("x")).where(F.col("x").isNotNull() & ~F.isnan("x"))


# ---- fixed-point sums -------------------------------------------------------------------------------------
def scale_bits(bound: float) -> int:
    """The power of two that maps magnitudes up to ``bound`` into 51 bits (``bound`` finite, >= 0; at
    most 2^1000, so the factor stays a finite double)."""
    return min(1000, 51 - math.frexp(bound)[1]) if bound > 0 else 0


def sum_parts(x: Column, bits: int, name: str) -> list[Column]:
    """Aggregations whose integer results :func:`fixed_sum` turns into the sum of ``x`` (|x| within the
    bound of ``bits``): each value times 2^bits rounded to an integer, as two longs."""
    m = F.rint(x * F.lit(math.ldexp(1.0, bits))).cast("long")
    hi = F.shiftright(m, _SPLIT)
    return [F.sum(hi).alias(f"{name}_hi"), F.sum(m - F.shiftleft(hi, _SPLIT)).alias(f"{name}_lo")]


def fixed_sum(row: Any, name: str, bits: int) -> Fraction:
    """The sum :func:`sum_parts` aggregated, exactly (integers add up the same in any order)."""
    hi, lo = int(row[f"{name}_hi"] or 0), int(row[f"{name}_lo"] or 0)
    return Fraction((hi << _SPLIT) + lo, 1 << bits) if bits >= 0 else Fraction(((hi << _SPLIT) + lo) << -bits)
