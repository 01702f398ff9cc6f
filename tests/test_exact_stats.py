"""Order-independent statistics (features/exact.py): exact against numpy, and the same whatever the
partitioning, where Spark's approxQuantile and floating-point sums are not."""

from __future__ import annotations

import math
import random
import sys
from fractions import Fraction

import numpy as np
from pyspark.sql import functions as F

from downpour.features import exact

PROBS = [0.0, 0.001, 0.01, 0.25, 0.5, 0.75, 0.999, 1.0]


def _lower(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[max(1, min(len(v), math.ceil(p * len(v)))) - 1]


def _columns(rng: random.Random, n: int) -> dict[str, list[float | None]]:
    """Continuous, heavy-tailed, discrete, tied, signed, tiny and huge values, nulls, NaN and infinities."""
    cont = [rng.lognormvariate(3, 1.5) for _ in range(n)]
    signed = [rng.gauss(0, 1) * 10 ** rng.randint(-300, 300) for _ in range(n)]
    discrete = [float(rng.choice([0, 0, 0, 1, 2, 5])) for _ in range(n)]
    near = [1.0 + rng.randint(0, 3) * 2.0 ** -52 for _ in range(n)]  # neighbouring doubles: the last pass
    odd = [rng.choice([None, float("nan"), float("inf"), -float("inf"), -0.0, 5e-324, rng.random()])
           for _ in range(n)]
    top = [rng.choice([1.0, -1.0]) * rng.choice(_TOP) for _ in range(n)]  # where log2 rounds up to 1024
    return {"cont": cont, "signed": signed, "discrete": discrete, "near": near, "odd": odd, "top": top}


_MAX = sys.float_info.max
_TOP = [_MAX, math.nextafter(_MAX, 0), 1.7976931348621712e308, math.nextafter(1.7976931348621712e308, 0),
        2.0 ** 1023, math.nextafter(2.0 ** 1023, 0), 4.5e307, 5e307, 2.0 ** -1022, 5e-324, 1e-320]


def test_quantiles_are_the_exact_lower_quantiles(spark):
    rng = random.Random(7)
    cols = _columns(rng, 3000)
    rows = list(zip(*cols.values(), strict=True))
    df = spark.createDataFrame(rows, ", ".join(f"{c} double" for c in cols)).repartition(5)
    got = exact.quantiles(df, {c: F.col(c) for c in cols}, PROBS)
    for c, values in cols.items():
        kept = [v for v in values if v is not None and not math.isnan(v)]
        assert got[c] == [_lower(kept, p) for p in PROBS], c
    empty = exact.quantiles(df.where(F.lit(False)), {"cont": F.col("cont")}, PROBS)
    assert empty == {"cont": None}


def test_quantiles_and_sums_do_not_move_with_the_partitioning_where_spark_s_do(spark):
    """The same 200,000 values in 1 and in 9 shuffled partitions: exact quantiles and fixed-point sums
    agree; the companion: approxQuantile (and a floating-point sum) of the very same frames do not, so
    this test can fail."""
    rng = random.Random(11)
    vals = [rng.lognormvariate(0, 2) for _ in range(200_000)]
    base = spark.createDataFrame([(i, v) for i, v in enumerate(vals)], "id long, x double")
    one = base.repartition(1).sortWithinPartitions("id")
    nine = base.repartition(9, "id").sortWithinPartitions(F.rand(3))
    probs = [0.001, 0.5, 0.999]
    assert exact.quantiles(one, {"x": F.col("x")}, probs) == exact.quantiles(nine, {"x": F.col("x")}, probs)
    assert one.approxQuantile("x", probs, 0.001) != nine.approxQuantile("x", probs, 0.001)

    bits = exact.scale_bits(max(abs(v) for v in vals))
    sums = [exact.fixed_sum(f.agg(*exact.sum_parts(F.col("x"), bits, "s")).first(), "s", bits) for f in (one, nine)]
    assert sums[0] == sums[1]
    assert abs(float(sums[0]) - math.fsum(vals)) <= len(vals) * 2.0 ** -bits
    floats = {f.agg(F.sum("x")).first()[0] for f in (one, nine, base.repartition(4).sortWithinPartitions(F.rand(5)))}
    assert len(floats) > 1, floats


def test_fixed_point_sums_are_exact_for_values_on_their_grid(spark):
    rng = random.Random(3)
    bound = 1e6
    bits = exact.scale_bits(bound)
    vals = [math.ldexp(rng.randint(-(2**40), 2**40), -bits) for _ in range(5000)] + [-bound, bound]
    df = spark.createDataFrame([(v,) for v in vals], "x double").repartition(3)
    got = exact.fixed_sum(df.agg(*exact.sum_parts(F.col("x"), bits, "s")).first(), "s", bits)
    assert got == sum(Fraction(v) for v in vals)
    assert np.isclose(float(got), math.fsum(vals))


def test_a_zero_quantile_is_always_positive_zero(spark):
    """Spark's min / max keep whichever of -0.0 and 0.0 comes first: the values are normalised first."""
    for order in (1, 2):
        df = spark.createDataFrame([(v,) for v in ([-0.0, 0.0] * 50)[::order]], "x double").repartition(3)
        got = exact.quantiles(df, {"x": F.col("x")}, [0.0, 0.5, 1.0])["x"]
        assert [math.copysign(1.0, v) for v in got] == [1.0, 1.0, 1.0]


def test_the_bin_s_logarithm_and_power_stand_once_in_the_plan(spark, plan_text):
    """The first pass bins every value of every column: its ``log2`` and ``pow`` are computed once per
    value (``exact._binned``), not once per branch of the bin's ``CASE`` that reads them."""
    values = [1.0, -3.5, 0.0, 7e-300, 3.0, 0.75] + _TOP + [-v for v in _TOP]
    df = spark.createDataFrame([(v, -v) for v in values], "a double, b double")
    binned = exact._binned(exact._values(df, [F.col("a"), F.col("b")], range(2)))
    plan = plan_text(binned).upper()
    assert plan.count("LOG2(") == 1 and plan.count("POWER(") == 1, plan
    got = {(r["i"], r["x"]): r["b"] for r in binned.collect()}
    assert got == {(r["i"], r["x"]): r["b"] for r in _one_expression_bins(df).collect()}  # the same bins
    by_value = sorted((x, b) for (_, x), b in got.items())
    assert [b for _, b in by_value] == sorted(b for _, b in by_value)  # ordered like the values
    # pass 2's join on the bin keeps one logarithm: no null check with the expression written into it
    inside = exact._inside(df, [F.col("a"), F.col("b")], [(0, got[(0, 3.0)], 0, 1)])
    assert plan_text(inside).upper().count("LOG2(") == 1


def _one_expression_bins(df):
    """The bin as one expression, the way the first pass used to write it."""
    x = exact._values(df, [F.col("a"), F.col("b")], range(2))
    a = F.abs(F.col("x"))
    e1 = F.floor(F.log2(a))
    r = a / F.pow(F.lit(2.0), e1)
    e = F.when(r >= 2, e1 + 1).when(r < 1, e1 - 1).otherwise(e1)
    frac = a / F.pow(F.lit(2.0), e) - F.lit(1.0)
    mag = (e.cast("long") + F.lit(1075)) * F.lit(256) + F.floor(frac * F.lit(256.0)).cast("long") + 1
    return x.select("i", "x", (F.when(F.col("x") == 0, F.lit(0).cast("long")).when(F.col("x") > 0, mag)
                               .otherwise(-mag)).alias("b"))


def test_the_plan_count_sees_a_logarithm_written_into_every_branch(spark, plan_text):
    """Companion: the bin as one expression puts several copies of the logarithm in the plan, which the
    count above would report."""
    df = spark.createDataFrame([(1.0, -3.5)], "a double, b double")
    assert plan_text(_one_expression_bins(df)).upper().count("LOG2(") > 1
