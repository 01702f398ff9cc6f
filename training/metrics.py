"""Binary-classification metrics computed in Spark, in one pass, so they scale to any row count.

How: one ``groupBy`` turns the (label, score) rows into a *score table*: per score bucket (ordered by
score) the row count, positives, sum of scores, min/max score and the per-row log-loss / Brier sums.
Everything else (ROC-AUC, average precision, recall at a false-positive rate, precision at k, lift,
gains, calibration, curves) is an exact cumulative sum on the driver over those buckets.

Precision. Buckets are ``round(logit(score) * resolution)`` (``resolution`` = 10,000 buckets per unit of
logit by default): fine where scores are dense *and* near 0 or 1 (fraud scores live at 1e-4), and
bounded (scores are clipped to [1e-45, 1 - 1e-15], so at most ~1.4 million buckets at the default
resolution whatever the row count; 1e-45 is just below float32's smallest subnormal, so no served score
but an exact 0 is clipped on the low side, where a rare-positive model puts most rows).
Rows that share a bucket are treated as tied, exactly like scikit-learn treats *equal* scores
(half credit for a tied positive/negative pair). So exact ties give scikit-learn's numbers, and
near-ties that merge can move ROC-AUC by at most ``auc_error_bound`` = 0.5 * sum_b pos_b * neg_b / (P * N),
which is reported with the metrics (typically < 1e-5). Log loss and Brier score are exact sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from downpour.logs import LOG, timed

EPS_LOW = 1e-45   # just below float32's smallest subnormal (served scores are float32): logit -103.6
EPS = 1e-15       # the top: 1 - EPS is representable in double (logit 34.5)
DEFAULT_RESOLUTION = 10_000
DECILES = 10
CALIBRATION_BINS = 10
HISTOGRAM_BINS = 50
CURVE_POINTS = 256


@dataclass(frozen=True)
class ScoreTable:
    """The (label, score) rows reduced to score buckets, sorted by score, highest first."""

    n: np.ndarray          # rows per bucket (int64)
    pos: np.ndarray        # positives per bucket (int64)
    score_sum: np.ndarray  # sum of scores per bucket
    score_min: np.ndarray
    score_max: np.ndarray
    log_loss_sum: float
    brier_sum: float
    invalid: int           # rows with a null label or a null/NaN/out-of-[0,1] score (excluded)
    resolution: int

    @property
    def rows(self) -> int:
        return int(self.n.sum())

    @property
    def positives(self) -> int:
        return int(self.pos.sum())

    @property
    def neg(self) -> np.ndarray:
        return self.n - self.pos


def _clipped(score: Column) -> Column:
    return F.least(F.greatest(score, F.lit(EPS_LOW)), F.lit(1.0 - EPS))


def _bucket(score: Column, resolution: int) -> Column:
    clipped = _clipped(score)
    logit = F.log(clipped) - F.log1p(-clipped)
    return F.round(logit * F.lit(float(resolution))).cast("long")


def score_tables(df: DataFrame, by: str | None = None, label_col: str = "label", score_col: str = "score",
                 resolution: int = DEFAULT_RESOLUTION) -> dict[Any, ScoreTable]:
    """One Spark aggregation for every group of ``by`` (e.g. the split): {group: ScoreTable}.

    The driver receives at most (groups x buckets) rows: bounded by the score resolution, not by the
    row count.
    """
    s = F.col(score_col).cast("double")
    lab = F.col(label_col).cast("double")
    valid = lab.isNotNull() & s.isNotNull() & ~F.isnan(s) & (s >= 0.0) & (s <= 1.0)
    y = (lab > 0.5).cast("double")
    clipped = _clipped(s)
    group = [F.col(by).alias("g")] if by else [F.lit(None).cast("string").alias("g")]
    rows = df.select(
        *group,
        F.when(valid, _bucket(s, resolution)).alias("b"),
        F.when(valid, y).alias("y"),
        F.when(valid, s).alias("s"),
        F.when(valid, -(y * F.log(clipped) + (1.0 - y) * F.log1p(-clipped))).alias("ll"),
        F.when(valid, (s - y) * (s - y)).alias("sq"),
    )
    agg = rows.groupBy("g", "b").agg(
        F.count(F.lit(1)).alias("n"), F.sum("y").alias("pos"), F.sum("s").alias("s_sum"),
        F.min("s").alias("s_min"), F.max("s").alias("s_max"),
        F.sum("ll").alias("ll"), F.sum("sq").alias("sq"),
    )
    out: dict[Any, ScoreTable] = {}
    for g, pdf in agg.toPandas().groupby("g", dropna=False, sort=True):
        bad = pdf["b"].isna()
        invalid = int(pdf.loc[bad, "n"].sum())
        pdf = pdf.loc[~bad].sort_values("b", ascending=False)
        out[None if by is None else g] = ScoreTable(
            n=pdf["n"].to_numpy(dtype=np.int64),
            pos=pdf["pos"].fillna(0).round().to_numpy(dtype=np.int64),
            score_sum=pdf["s_sum"].to_numpy(dtype=np.float64),
            score_min=pdf["s_min"].to_numpy(dtype=np.float64),
            score_max=pdf["s_max"].to_numpy(dtype=np.float64),
            log_loss_sum=float(pdf["ll"].sum()),
            brier_sum=float(pdf["sq"].sum()),
            invalid=invalid,
            resolution=resolution,
        )
        if invalid:
            LOG.warning("metrics%s: %d rows with a null label or a null/NaN/out-of-range score were excluded",
                        f" ({g})" if by else "", invalid)
    return out


def score_table(df: DataFrame, label_col: str = "label", score_col: str = "score",
                resolution: int = DEFAULT_RESOLUTION) -> ScoreTable:
    """One Spark aggregation: (label, score) rows -> ScoreTable on the driver (bounded size)."""
    tables = score_tables(df, None, label_col, score_col, resolution)
    return tables.get(None) or table_from_arrays([], [], resolution)


def table_from_arrays(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray,
                      resolution: int = DEFAULT_RESOLUTION) -> ScoreTable:
    """The same ScoreTable from in-memory arrays (small samples, tests): identical bucketing rules."""
    lab = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    valid = ~np.isnan(lab) & ~np.isnan(s) & (s >= 0) & (s <= 1)
    lab, s = lab[valid], s[valid]
    y = (lab > 0.5).astype(np.float64)
    c = np.clip(s, EPS_LOW, 1 - EPS)
    b = np.round((np.log(c) - np.log1p(-c)) * resolution).astype(np.int64)
    keys, inv = np.unique(-b, return_inverse=True)  # ascending -b == descending score
    k = len(keys)
    smin = np.full(k, np.inf)
    smax = np.full(k, -np.inf)
    np.minimum.at(smin, inv, s)
    np.maximum.at(smax, inv, s)
    return ScoreTable(
        n=np.bincount(inv, minlength=k).astype(np.int64),
        pos=np.bincount(inv, weights=y, minlength=k).round().astype(np.int64),
        score_sum=np.bincount(inv, weights=s, minlength=k), score_min=smin, score_max=smax,
        log_loss_sum=float(-(y * np.log(c) + (1 - y) * np.log1p(-c)).sum()),
        brier_sum=float(((s - y) ** 2).sum()), invalid=int((~valid).sum()), resolution=resolution,
    )


# ---- scalar metrics (pure numpy on the driver) ----------------------------------------------------

def _cum(t: ScoreTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (rows, tp, fp) after each bucket, with a leading 0 (threshold above every score)."""
    z = np.zeros(1, dtype=np.int64)
    return (np.concatenate([z, np.cumsum(t.n)]), np.concatenate([z, np.cumsum(t.pos)]),
            np.concatenate([z, np.cumsum(t.neg)]))


def roc_auc(t: ScoreTable) -> float:
    """Mann-Whitney U / (P * N): tied pairs (same bucket) count one half, as in scikit-learn."""
    p, n = t.positives, t.rows - t.positives
    if p == 0 or n == 0:
        return float("nan")
    _, tp, _ = _cum(t)
    wins = (t.neg.astype(np.float64) * (tp[:-1] + 0.5 * t.pos)).sum()
    return float(wins / (float(p) * float(n)))


def auc_error_bound(t: ScoreTable) -> float:
    """Largest possible ROC-AUC error from merging distinct scores into one bucket."""
    p, n = t.positives, t.rows - t.positives
    if p == 0 or n == 0:
        return float("nan")
    merged = t.n > 1
    if t.score_min.size:
        merged &= t.score_max > t.score_min  # buckets holding one distinct score are exact ties
    return float(0.5 * (t.pos[merged].astype(np.float64) * t.neg[merged]).sum() / (float(p) * float(n)))


def average_precision(t: ScoreTable) -> float:
    """sum_k (R_k - R_{k-1}) * P_k over descending thresholds (scikit-learn's definition, no interpolation)."""
    p = t.positives
    if p == 0:
        return float("nan")
    rows, tp, _ = _cum(t)
    precision = tp[1:] / rows[1:]
    return float((t.pos / p * precision).sum())


def recall_at_fpr(t: ScoreTable, fpr: float) -> tuple[float, float]:
    """(recall, threshold) of the lowest threshold whose false-positive rate is still <= ``fpr``."""
    p, n = t.positives, t.rows - t.positives
    if p == 0 or n == 0:
        return float("nan"), float("nan")
    _, tp, fp = _cum(t)
    ok = np.nonzero(fp / n <= fpr + 1e-12)[0]
    k = int(ok[-1])
    threshold = float(t.score_min[k - 1]) if k > 0 else 1.0
    return float(tp[k] / p), threshold


def precision_at_k(t: ScoreTable, k: int) -> float:
    """Share of positives among the ``k`` highest scores (ties at the cut shared pro rata)."""
    total = t.rows
    if total == 0:
        return float("nan")
    k = min(int(k), total)
    rows, tp, _ = _cum(t)
    return float(np.interp(k, rows, tp) / k)


def deciles(t: ScoreTable, parts: int = DECILES) -> list[dict[str, float]]:
    """Rows ranked by score, cut into ``parts`` equal groups: rate, lift, cumulative gains and lift."""
    total, p = t.rows, t.positives
    if total == 0:
        return []
    rows, tp, _ = _cum(t)
    cuts = np.linspace(0, total, parts + 1)
    cum_pos = np.interp(cuts, rows, tp)
    base = p / total
    out = []
    for d in range(parts):
        n_d = cuts[d + 1] - cuts[d]
        pos_d = cum_pos[d + 1] - cum_pos[d]
        rate = pos_d / n_d if n_d else float("nan")
        cum_rate = cum_pos[d + 1] / cuts[d + 1]
        out.append({
            "decile": d + 1, "rows": float(n_d), "positives": float(pos_d), "rate": float(rate),
            "lift": float(rate / base) if base else float("nan"),
            "cumulative_gain": float(cum_pos[d + 1] / p) if p else float("nan"),
            "cumulative_lift": float(cum_rate / base) if base else float("nan"),
            "min_score": float(t.score_min[min(np.searchsorted(rows[1:], cuts[d + 1]), t.n.size - 1)]),
        })
    return out


def calibration(t: ScoreTable, bins: int = CALIBRATION_BINS) -> list[dict[str, float]]:
    """Equal-width score bins: mean predicted score vs observed positive rate (empty bins left out)."""
    if t.rows == 0:
        return []
    mean = t.score_sum / t.n
    idx = np.minimum((mean * bins).astype(np.int64), bins - 1)
    n = np.bincount(idx, weights=t.n, minlength=bins)
    pos = np.bincount(idx, weights=t.pos, minlength=bins)
    ssum = np.bincount(idx, weights=t.score_sum, minlength=bins)
    return [
        {"bin": b, "lower": b / bins, "upper": (b + 1) / bins, "rows": int(n[b]),
         "mean_score": float(ssum[b] / n[b]), "observed_rate": float(pos[b] / n[b])}
        for b in range(bins) if n[b] > 0
    ]


def expected_calibration_error(cal: list[dict[str, float]]) -> float:
    total = sum(c["rows"] for c in cal)
    if not total:
        return float("nan")
    return float(sum(c["rows"] * abs(c["mean_score"] - c["observed_rate"]) for c in cal) / total)


def score_histogram(t: ScoreTable, bins: int = HISTOGRAM_BINS) -> dict[str, list[float]]:
    """Score distribution per class on equal-width bins (for the report)."""
    mean = t.score_sum / np.maximum(t.n, 1)
    idx = np.minimum((mean * bins).astype(np.int64), bins - 1)
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "positive": np.bincount(idx, weights=t.pos, minlength=bins).tolist(),
        "negative": np.bincount(idx, weights=t.neg, minlength=bins).tolist(),
    }


def curves(t: ScoreTable, max_points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """ROC and PR curve points, down-sampled to about ``max_points`` (dense at low false-positive rates)."""
    p, n = t.positives, t.rows - t.positives
    if p == 0 or n == 0:
        return {"fpr": [], "tpr": [], "recall": [], "precision": [], "threshold": []}
    rows, tp, fp = _cum(t)
    fpr, tpr = fp / n, tp / p
    quarter = max(max_points // 4, 2)
    targets_fpr = np.concatenate([np.linspace(0, 1, 2 * quarter), np.logspace(-5, 0, quarter)])
    idx = np.concatenate([
        np.searchsorted(fpr, targets_fpr, side="right") - 1,
        np.searchsorted(tpr, np.linspace(0, 1, quarter), side="left"),
        [0, len(fpr) - 1],
    ])
    idx = np.unique(np.clip(idx, 0, len(fpr) - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(rows > 0, tp / np.maximum(rows, 1), 1.0)
    thresholds = np.concatenate([[1.0], t.score_min])
    return {
        "fpr": fpr[idx].tolist(), "tpr": tpr[idx].tolist(), "recall": tpr[idx].tolist(),
        "precision": precision[idx].tolist(), "threshold": thresholds[idx].tolist(),
    }


def _key(x: float) -> str:
    return f"{x:g}"


def metrics_from_table(t: ScoreTable, fpr_points: Sequence[float] = (0.001, 0.01),
                       precision_at: Sequence[int] = (100, 1000)) -> dict[str, Any]:
    """Scalar metrics with flat, MLflow-safe names, plus deciles and calibration bins."""
    total, p = t.rows, t.positives
    out: dict[str, Any] = {
        "rows": total, "positives": p, "base_rate": p / total if total else float("nan"),
        "roc_auc": roc_auc(t), "pr_auc": average_precision(t),
        "log_loss": t.log_loss_sum / total if total else float("nan"),
        "brier": t.brier_sum / total if total else float("nan"),
    }
    for f in fpr_points:
        recall, threshold = recall_at_fpr(t, f)
        out[f"recall_at_fpr_{_key(f)}"] = recall
        out[f"threshold_at_fpr_{_key(f)}"] = threshold
    for k in precision_at:
        out[f"precision_at_{int(k)}"] = precision_at_k(t, k)
    dec = deciles(t)
    cal = calibration(t)
    out["lift_top_decile"] = dec[0]["lift"] if dec else float("nan")
    out["ece"] = expected_calibration_error(cal)
    out["auc_error_bound"] = auc_error_bound(t)
    out["excluded_rows"] = t.invalid
    out["deciles"] = dec
    out["calibration"] = cal
    return out


def scalar_metrics(m: dict[str, Any]) -> dict[str, float]:
    """Only the scalar entries (for model cards, MLflow and the gate); NaN becomes None for JSON."""
    out: dict[str, float] = {}
    for k, v in m.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[k] = None if isinstance(v, float) and math.isnan(v) else v  # type: ignore[assignment]
    return out


def full_metrics(t: ScoreTable, fpr_points: Sequence[float] = (0.001, 0.01),
                 precision_at: Sequence[int] = (100, 1000)) -> dict[str, Any]:
    """Scalars, deciles, calibration, curves and histogram of one ScoreTable."""
    out = metrics_from_table(t, fpr_points, precision_at)
    out["curves"] = curves(t)
    out["histogram"] = score_histogram(t)
    return out


def evaluate_scores_by(df: DataFrame, by: str, label_col: str = "label", score_col: str = "score",
                       fpr_points: Sequence[float] = (0.001, 0.01), precision_at: Sequence[int] = (100, 1000),
                       resolution: int = DEFAULT_RESOLUTION, what: str = "scores") -> dict[Any, dict[str, Any]]:
    """:func:`evaluate_scores` for every group of ``by`` (e.g. val and test) in the same single pass."""
    with timed(f"metrics for {what} by {by}"):
        tables = score_tables(df, by, label_col, score_col, resolution)
        out = {g: full_metrics(t, fpr_points, precision_at) for g, t in tables.items()}
    for g, m in out.items():
        LOG.info("%s %s: rows=%d roc_auc=%.4f pr_auc=%.4f log_loss=%.4f", what, g, m["rows"], m["roc_auc"],
                 m["pr_auc"], m["log_loss"])
    return out


def evaluate_scores(df: DataFrame, label_col: str = "label", score_col: str = "score",
                    fpr_points: Sequence[float] = (0.001, 0.01), precision_at: Sequence[int] = (100, 1000),
                    resolution: int = DEFAULT_RESOLUTION, what: str = "scores") -> dict[str, Any]:
    """All metrics of a (label, score) DataFrame in one Spark pass; ``curves`` and ``histogram`` included."""
    with timed(f"metrics for {what}"):
        out = full_metrics(score_table(df, label_col, score_col, resolution), fpr_points, precision_at)
    LOG.info("%s: rows=%d roc_auc=%.4f pr_auc=%.4f log_loss=%.4f", what, out["rows"], out["roc_auc"],
             out["pr_auc"], out["log_loss"])
    return out
