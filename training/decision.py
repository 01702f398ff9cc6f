"""Decisions under cost: the score threshold that minimises the expected cost on the val split.

A team acts on a row (blocks a payment, sends it to review, calls the customer) when its score is at
least the threshold. With the costs in ``evaluation.decision``::

    cost(t) = action_cost        x rows acted on
            + false_positive_cost x negatives acted on
            + missed cost         of the positives not acted on (a number, or a column such as the amount)

``evaluate`` computes the cost of every candidate threshold on the val split in one Spark pass (rows
grouped by their score floored to 1e-6, so every row of a group is acted on at that group's value),
picks the cheapest one within the alert budget (``max_action_rate``), reports the same operating
point on test, and writes it into the model card (``decision``); ``score`` adds a ``decision`` column
(score >= threshold) for models that carry one.
The val split only: test is where the choice is checked, never where it is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from downpour.artifact import DECISION_RESOLUTION as RESOLUTION  # thresholds are multiples of 1e-6
from downpour.pipelines.serving import score_bucket


@dataclass(frozen=True)
class Costs:
    action: float
    false_positive: float
    missed: float  # per positive, when no column gives it per row

    @classmethod
    def of(cls, decision: Any) -> Costs:
        return cls(float(decision.action_cost), float(decision.false_positive_cost), float(decision.missed_cost))


def cost_table(scored: DataFrame, missed_cost: Any) -> pd.DataFrame:
    """Per score bucket (floored to 1e-6): rows, positives and the missed cost of its positives.

    ``scored`` has ``score`` and ``label`` (1 positive); ``missed_cost`` is a Column (per row) or a number.
    One aggregation; the result has at most a million rows whatever the split's size."""
    per_row = missed_cost if isinstance(missed_cost, F.Column) else F.lit(float(missed_cost))
    bucket = score_bucket(F.col("score"))
    positive = (F.col("label") == 1).cast("long")
    table = (scored.groupBy(bucket.alias("bucket"))
             .agg(F.count(F.lit(1)).alias("rows"), F.sum(positive).alias("positives"),
                  F.sum(F.when(F.col("label") == 1, F.coalesce(per_row.cast("double"), F.lit(0.0)))
                        .otherwise(0.0)).alias("missed_cost"))
             .toPandas())
    return table.sort_values("bucket", ascending=False, ignore_index=True)


@dataclass(frozen=True)
class Curve:
    """Cost of acting on every row scoring >= each candidate threshold (descending), and of acting on none."""

    thresholds: np.ndarray  # [inf, t0 > t1 > ...]
    acted: np.ndarray
    true_positives: np.ndarray
    cost: np.ndarray
    rows: int
    positives: int
    missed_total: float  # the cost of acting on nothing

    def point(self, i: int) -> dict[str, Any]:
        acted, tp = int(self.acted[i]), int(self.true_positives[i])
        cost = float(self.cost[i])
        return {"threshold": threshold_of(float(self.thresholds[i])), "rows": self.rows, "acted": acted,
                "action_rate": acted / self.rows if self.rows else 0.0, "true_positives": tp,
                "false_positives": acted - tp, "missed_positives": self.positives - tp,
                "cost": cost, "cost_per_row": cost / self.rows if self.rows else 0.0,
                "cost_if_no_action": self.missed_total, "savings": self.missed_total - cost}

    def at(self, threshold: float | None) -> dict[str, Any]:
        """The operating point of acting on every row scoring >= ``threshold`` (None: on no row)."""
        if threshold is None:
            return self.point(0)
        i = int(np.searchsorted(-self.thresholds, -threshold, side="right")) - 1
        return self.point(max(i, 0)) | {"threshold": float(threshold)}


def threshold_of(t: float) -> float | None:
    """JSON-safe: None stands for "act on no row" (the curve's infinite first threshold)."""
    return None if np.isinf(t) else t


def cost_curve(table: pd.DataFrame, costs: Costs) -> Curve:
    """Cumulative sums over the buckets, highest score first."""
    t = table.sort_values("bucket", ascending=False)
    acted = np.concatenate([[0], np.cumsum(t["rows"].to_numpy())])
    tp = np.concatenate([[0], np.cumsum(t["positives"].to_numpy())])
    caught = np.concatenate([[0.0], np.cumsum(t["missed_cost"].to_numpy(dtype=float))])
    missed_total = float(caught[-1])
    cost = costs.action * acted + costs.false_positive * (acted - tp) + (missed_total - caught)
    thresholds = np.concatenate([[np.inf], t["bucket"].to_numpy(dtype=float) / RESOLUTION])
    return Curve(thresholds, acted, tp, cost, int(acted[-1]), int(tp[-1]), missed_total)


def choose(curve: Curve, max_action_rate: float | None = None) -> int:
    """Index of the cheapest threshold within the alert budget; ties go to acting on fewer rows."""
    allowed = np.ones(len(curve.cost), dtype=bool)
    if max_action_rate is not None and curve.rows:
        allowed = curve.acted <= max_action_rate * curve.rows
    cost = np.where(allowed, curve.cost, np.inf)
    return int(np.argmin(cost))  # argmin takes the first minimum: the highest threshold


@dataclass(frozen=True)
class Decision:
    threshold: float | None  # act when score >= threshold; None: acting on no row is cheapest
    val: dict[str, Any]
    test: dict[str, Any] | None
    costs: dict[str, Any]
    max_action_rate: float | None
    missed_cost_column: str | None

    def to_card(self) -> dict[str, Any]:
        return asdict(self)


def missed_cost_of(decision: Any) -> Any:
    """What ``cost_table`` takes: the per-row column (its values are read from ``missed_cost``) or a number."""
    return F.col("missed_cost") if decision.missed_cost_column else decision.missed_cost


def decide(val: DataFrame, test: DataFrame | None, decision: Any) -> tuple[Decision, Curve]:
    """Choose on ``val``, report on ``test``; both have ``score``, ``label`` and (for a per-row missed
    cost) ``missed_cost``."""
    costs = Costs.of(decision)
    curve = cost_curve(cost_table(val, missed_cost_of(decision)), costs)
    i = choose(curve, decision.max_action_rate)
    threshold = threshold_of(float(curve.thresholds[i]))
    on_test = None
    if test is not None:
        on_test = cost_curve(cost_table(test, missed_cost_of(decision)), costs).at(threshold)
    return Decision(threshold=threshold, val=curve.point(i), test=on_test, costs=asdict(costs),
                    max_action_rate=decision.max_action_rate,
                    missed_cost_column=decision.missed_cost_column), curve
