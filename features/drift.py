"""Drift: how far a scoring batch has moved from the data the model learned from.

``prepare`` fits a reference on the train split (exact deciles, features/exact.py, and one aggregation):
for each numeric feature column its decile edges and the share of train rows in each bin (nulls are
a bin of their own), for each vocabulary-encoded categorical column the values of its vocabulary
(seen ``min_count`` times, the ``top_k`` most frequent, at most ``MAX_VALUES``). ``evaluate`` adds
the same for the model's score on val. ``train`` carries the reference in the model card, so it
travels with the model.

``score`` profiles its batch in one aggregation against that reference: the population stability
index (PSI, ``sum((a - e) * ln(a / e))`` over the bins, shares floored at ``EPS``) per numeric
feature and for the score, and per categorical column the share of values train never saw. Above
``scoring.drift`` thresholds the summary says ``"drift": true`` with the reasons.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from downpour.features import exact
from downpour.features.passes import Counted, Passes, TopValues
from downpour.logs import LOG, timed
from downpour.spark import aggregate_row

BINS = 10
MAX_VALUES = 1000
EPS = 1e-4


def _bin_index(col: Column, edges: list[float]) -> Column:
    """0..len(edges) for values (bin k holds edges[k-1] <= x < edges[k]), len(edges)+1 for null."""
    index = sum((F.when(col >= F.lit(e), 1).otherwise(0) for e in edges), F.lit(0))
    return F.when(col.isNull(), F.lit(len(edges) + 1)).otherwise(index)


def _bins(columns: dict[str, tuple[Column, list[float]]], prefix: str = ""
          ) -> tuple[dict[str, Column], list[Column]]:
    """Each column's bin index as a per-row column (``__bin<i>``, computed once), and one count per
    (column, bin) over those indices (aliased ``<prefix><key>#<bin>``), to be evaluated in one aggregation.

    Why per-row columns first: with the index written into every count, the aggregation held each
    column's edge comparisons ``len(edges) + 2`` times over, and on small tables building and planning
    that tree took longer than the counting (benchmarks/README.md, "Investigation: a small run's fixed
    costs"). Catalyst keeps the projection, as each index is read more than once."""
    bins = {f"__bin{prefix}{i}": _bin_index(col.cast("double"), edges)
            for i, (col, edges) in enumerate(columns.values())}
    out = []
    for i, (key, (_, edges)) in enumerate(columns.items()):
        idx = F.col(f"__bin{prefix}{i}")
        out += [F.count(F.when(idx == k, 1)).alias(f"{prefix}{key}#{k}") for k in range(len(edges) + 2)]
    return bins, out


def _shares(row: Any, key: str, n_bins: int, total: int) -> list[float]:
    return [(int(row[f"{key}#{k}"] or 0) / total) if total else 0.0 for k in range(n_bins)]


DECILES = [k / BINS for k in range(1, BINS)]
_FIT = "drift:"  # the prefix of the reference's aggregations among the other fits' (features/passes.py)


def numeric_reference(df: DataFrame, columns: dict[str, Column],
                      known: exact.Table | None = None) -> dict[str, dict[str, Any]]:
    """{key: {edges, shares}} of ``columns`` (key -> numeric Column) over ``df``: the exact deciles' passes
    (or ``known``'s deciles, by the same keys) and one aggregation."""
    passes = Passes()
    finish = _numeric_fitting(df, columns, known, passes)
    return finish(passes.run(df))


def _numeric_fitting(df: DataFrame, columns: dict[str, Column], known: exact.Table | None,
                     passes: Passes) -> Callable[[Counted], dict[str, dict[str, Any]]]:
    if not columns:
        return lambda counted: {}
    quantiles = exact.quantiles_of(known, df, columns, DECILES)  # the same edges whatever the partitioning
    edges = {key: sorted({float(q) for q in qs or []}) for key, qs in quantiles.items()}
    bins, counts = _bins({key: (col, edges[key]) for key, col in columns.items()}, _FIT)
    passes.columns(bins)
    passes.aggregate(F.count(F.lit(1)).alias(f"{_FIT}n"), *counts)

    def finish(counted: Counted) -> dict[str, dict[str, Any]]:
        row = counted.row
        total = int(row[f"{_FIT}n"])
        return {key: {"edges": edges[key], "shares": _shares(row, f"{_FIT}{key}", len(edges[key]) + 2, total)}
                for key in columns}

    return finish


def quantiles_wanted(cfg: Any) -> dict[str, list[float]]:
    """The exact quantiles :func:`fit_reference` reads, per (safe) column name: the deciles."""
    return {cfg.names[s.column]: DECILES for s in cfg.features.numeric_specs()}


def fit_reference(train: DataFrame, cfg: Any, quantiles: exact.Table | None = None) -> dict[str, Any]:
    """The drift reference of the train split's clean rows (raw feature columns, before the transform).
    ``quantiles``: an :func:`exact.table` of those rows (by safe column name) holding :func:`quantiles_wanted`."""
    passes = Passes()
    finish = reference_fitting(train, cfg, quantiles, passes)
    return finish(passes.run(train))


def reference_fitting(train: DataFrame, cfg: Any, quantiles: exact.Table | None,
                      passes: Passes) -> Callable[[Counted], dict[str, Any]]:
    """:func:`fit_reference` in two steps: add its aggregation and value counts to ``passes`` (which the
    caller runs over ``train``, with other fits' work), then build the reference from what they counted."""
    names = cfg.names
    numeric = {s.column: F.col(names[s.column]) for s in cfg.features.numeric_specs()}
    known = {c: quantiles[names[c]] for c in numeric if names[c] in quantiles} if quantiles is not None else None
    numeric_done = _numeric_fitting(train, numeric, known, passes)
    # hashed columns are high-cardinality by design: only vocabulary columns are checked for unseen values.
    # The vocabulary's own rule (features/passes.py): values seen min_count times, the top_k most
    # frequent; rarer values are out of vocabulary for the model, so they count as unseen here, and they
    # never reach the card. The raw value as a string, as scoring's profile compares it.
    specs = {s.column: s for s in cfg.features.categorical_specs() if s.encoding == "vocab"}
    passes.top_values(*[TopValues(f"{_FIT}{c}", F.col(names[c]).cast("string"), s.min_count,
                                  min(s.top_k, MAX_VALUES)) for c, s in specs.items()])

    def finish(counted: Counted) -> dict[str, Any]:
        return {"bins": BINS, "numeric": numeric_done(counted),
                "categorical": {c: {"values": sorted(counted.tops[f"{_FIT}{c}"])} for c in specs}}

    return finish


def psi(expected: list[float], actual: list[float]) -> float:
    """Population stability index of two share vectors over the same bins (shares floored at EPS)."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, EPS), max(a, EPS)
        total += (a - e) * math.log(a / e)
    return total


def profile(df: DataFrame, ref: dict[str, Any], names: dict[str, str], score: Column | None = None,
            score_ref: dict[str, Any] | None = None) -> dict[str, Any]:
    """PSI per numeric feature (and of ``score`` against ``score_ref``) and the unseen share per
    categorical column of ``df``, in one aggregation."""
    specs = {f"n:{c}": (F.col(names[c]), r["edges"]) for c, r in (ref.get("numeric") or {}).items()
             if names.get(c) in df.columns}
    if score is not None and score_ref:
        specs["score"] = (score, score_ref["edges"])
    unseen = {c: r["values"] for c, r in (ref.get("categorical") or {}).items()
              if r.get("values") is not None and names.get(c) in df.columns}
    bins, counts = _bins(specs)
    binned = df.withColumns(bins)
    aggs = [F.count(F.lit(1)).alias("__n"), *counts]
    for c, values in unseen.items():
        col = F.col(names[c]).cast("string")
        aggs.append(F.sum(F.when(col.isNotNull() & ~col.isin(values), 1).otherwise(0)).alias(f"u:{c}"))
        aggs.append(F.sum(F.when(col.isNotNull(), 1).otherwise(0)).alias(f"k:{c}"))
    row = aggregate_row(binned, aggs)
    total = int(row["__n"])
    out: dict[str, Any] = {"rows": total, "features": {}, "score": None, "unseen": {}}
    for key, (_, edges) in specs.items():
        reference = ref["numeric"][key[2:]] if key != "score" else score_ref
        value = round(psi(reference["shares"], _shares(row, key, len(edges) + 2, total)), 6) if total else None
        if key == "score":
            out["score"] = value
        else:
            out["features"][key[2:]] = value
    for c in unseen:
        known = int(row[f"k:{c}"] or 0)
        out["unseen"][c] = round(int(row[f"u:{c}"] or 0) / known, 6) if known else 0.0
    return out


def judge(prof: dict[str, Any], psi_threshold: float, unseen_threshold: float) -> dict[str, Any]:
    """The profile with ``drift`` (bool) and the reasons, against the thresholds."""
    reasons = [f"{c}: PSI {v:.3f} > {psi_threshold:g}" for c, v in prof["features"].items()
               if v is not None and v > psi_threshold]
    if prof["score"] is not None and prof["score"] > psi_threshold:
        reasons.append(f"score: PSI {prof['score']:.3f} > {psi_threshold:g}")
    reasons += [f"{c}: {v:.2%} unseen values > {unseen_threshold:.2%}" for c, v in prof["unseen"].items()
                if v > unseen_threshold]
    return {**prof, "thresholds": {"psi": psi_threshold, "unseen": unseen_threshold},
            "drift": bool(reasons), "reasons": reasons}


def batch_drift(settings: Any, card: dict[str, Any], clean_rows: DataFrame, scored: DataFrame, score: Column,
                names: dict[str, str]) -> dict[str, Any] | None:
    """``score``'s drift figures (``scoring.drift`` as ``settings``): PSI per numeric feature over the
    batch's clean rows and of ``score`` over its scored rows, unseen categorical values, judged against the
    model card's reference; None when off or when the model carries no reference."""
    ref = card.get("drift_reference")
    if not settings.enabled:
        return None
    if not ref:
        LOG.info("score: model %s carries no drift reference (trained before drift checks); no drift figures",
                 card.get("model_version"))
        return None
    with timed("score: drift against the training data"):
        prof = profile(clean_rows, ref, names)
        prof["score"] = profile(scored, {}, names, score=score, score_ref=ref.get("score"))["score"]
        out = judge(prof, settings.psi_threshold, settings.unseen_threshold)
    if out["drift"]:
        LOG.warning("score: the batch has drifted from the training data: %s", "; ".join(out["reasons"]))
    return out
