"""The evaluation report: one self-contained HTML page (inline CSS, no scripts) with PNG plots beside it.

Everything shown is an aggregate (metrics, curves, counts, reasons); no row and no id ever reaches the
report, so it is safe to mail around even when the data holds PII.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from downpour.layout import REPORT_HTML  # noqa: E402
from downpour.logs import timed  # noqa: E402

SECTIONS = ("summary", "metrics", "decision", "roc", "pr", "gains", "calibration", "scores", "training", "data")
_DECISION_ROWS = ("threshold", "rows", "acted", "action_rate", "true_positives", "false_positives",
                  "missed_positives", "cost", "cost_per_row", "cost_if_no_action", "savings")
_COLORS = {"model": "#1f77b4", "baseline": "#ff7f0e", "GBT baseline": "#2ca02c", "champion": "#9467bd",
           "random": "#999999"}
_TRAINING_SUMMARY = ("workers", "devices_per_worker", "epochs_completed", "best_epoch", "stopped_early",
                     "global_batch_size", "learning_rate", "examples_per_s", "duration_s")
_TABLE_METRICS = ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "lift_top_decile")


def _fmt(v: Any) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        if math.isnan(v):
            return "&ndash;"
        return f"{v:,.4f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _series(metrics: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, Mapping[str, Any]] | None,
            champion: Mapping[str, Any] | None = None, gbt: Mapping[str, Mapping[str, Any]] | None = None,
            ) -> list[tuple[str, str, str, Mapping[str, Any]]]:
    """(label, color, linestyle, metrics) for every curve: model and baselines on test/val, champion on test."""
    out = []
    for who, group in (("model", metrics), ("baseline", baseline or {}), ("GBT baseline", gbt or {})):
        for split, style in (("test", "-"), ("val", "--")):
            if split in group:
                out.append((f"{who} ({split})", _COLORS[who], style, group[split]))
    if champion:
        out.append(("champion (test)", _COLORS["champion"], "-.", champion))
    return out


def plot_roc(series: list, path: Path) -> str:
    fig, (ax, axl) = plt.subplots(1, 2, figsize=(10, 4.4))
    for label, color, ls, m in series:
        c = m.get("curves") or {}
        if c.get("fpr"):
            txt = f"{label} AUC={m['roc_auc']:.3f}"
            ax.plot(c["fpr"], c["tpr"], color=color, ls=ls, label=txt)
            axl.plot([max(x, 1e-5) for x in c["fpr"]], c["tpr"], color=color, ls=ls, label=label)
    ax.plot([0, 1], [0, 1], color=_COLORS["random"], lw=0.8, ls=":", label="random")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate (recall)", title="ROC", xlim=(0, 1),
           ylim=(0, 1.01))
    axl.set_xscale("log")
    axl.set(xlabel="false-positive rate (log scale)", ylabel="recall", title="ROC at low false-positive rates",
            xlim=(1e-4, 1), ylim=(0, 1.01))
    for a in (ax, axl):
        a.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(series: list, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4.4))
    base = None
    for label, color, ls, m in series:
        c = m.get("curves") or {}
        if c.get("recall"):
            ax.plot(c["recall"], c["precision"], color=color, ls=ls, label=f"{label} AP={m['pr_auc']:.3f}")
            base = base if base is not None else m.get("base_rate")
    if base is not None:
        ax.axhline(base, color=_COLORS["random"], lw=0.8, ls=":", label=f"base rate {base:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_gains(series: list, path: Path) -> str:
    fig, (ax, axl) = plt.subplots(1, 2, figsize=(10, 4.4))
    tests = [s for s in series if s[0].endswith("(test)")] or series
    width = 0.8 / max(len(tests), 1)
    for i, (label, color, ls, m) in enumerate(tests):
        dec = m.get("deciles") or []
        if not dec:
            continue
        x = [0] + [d["decile"] * 10 for d in dec]
        ax.plot(x, [0] + [100 * d["cumulative_gain"] for d in dec], color=color, ls=ls, marker="o", ms=3,
                label=label)
        axl.bar([d["decile"] + (i - (len(tests) - 1) / 2) * width for d in dec], [d["lift"] for d in dec],
                width=width, color=color, label=label)
    ax.plot([0, 100], [0, 100], color=_COLORS["random"], lw=0.8, ls=":", label="random")
    ax.set(xlabel="% of rows contacted (highest scores first)", ylabel="% of positives found",
           title="Cumulative gains", xlim=(0, 100), ylim=(0, 101))
    axl.axhline(1.0, color=_COLORS["random"], lw=0.8, ls=":")
    axl.set(xlabel="decile (1 = highest scores)", ylabel="lift (rate / base rate)", title="Lift by decile",
            xticks=range(1, 11))
    for a in (ax, axl):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path)


def plot_calibration(series: list, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4.4))
    for label, color, ls, m in series:
        cal = m.get("calibration") or []
        if cal:
            ax.plot([c["mean_score"] for c in cal], [c["observed_rate"] for c in cal], color=color, ls=ls,
                    marker="o", ms=3, label=f"{label} ECE={m.get('ece', float('nan')):.3f}")
    ax.plot([0, 1], [0, 1], color=_COLORS["random"], lw=0.8, ls=":", label="perfectly calibrated")
    ax.set(xlabel="mean predicted score (per bin)", ylabel="observed positive rate", title="Calibration",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_scores(m: Mapping[str, Any], path: Path, split: str) -> str:
    h = m.get("histogram") or {}
    fig, ax = plt.subplots(figsize=(6, 4.4))
    if h.get("edges"):
        edges = h["edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        w = edges[1] - edges[0]
        for key, color in (("negative", "#2ca02c"), ("positive", "#d62728")):
            counts = h[key]
            total = sum(counts) or 1
            ax.bar(centers, [c / total for c in counts], width=w, alpha=0.55, color=color,
                   label=f"{key} ({int(total):,} rows)")
    ax.set(xlabel="score", ylabel="share of the class", title=f"Score distribution per class ({split})",
           xlim=(0, 1))
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def history_series(history: Any) -> dict[str, list[float]]:
    """Keras-style ``{"loss": [...]}``, a list of per-epoch dicts, or ``{"epochs": [...]}`` -> dict of
    lists (``epoch`` included when the history has it)."""
    if isinstance(history, Mapping) and "epochs" in history and isinstance(history["epochs"], list):
        history = history["epochs"]
    if isinstance(history, list):
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]
        return {k: [row.get(k, float("nan")) for row in history] for k in keys}
    if isinstance(history, Mapping):
        return {k: list(v) for k, v in history.items() if isinstance(v, list)}
    return {}


_QUALITY = ("auc", "acc", "precision", "recall", "f1")


def plot_training(history: Any, path: Path) -> str | None:
    """Loss and quality metrics per epoch (throughput and timings are left out: other units)."""
    series = {k: v for k, v in history_series(history).items()
              if v and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)}
    epochs = series.pop("epoch", None)
    loss = {k: v for k, v in series.items() if "loss" in k}
    quality = {k: v for k, v in series.items() if "loss" not in k and any(q in k for q in _QUALITY)}
    groups = [(title, g) for title, g in (("loss", loss), ("metrics", quality)) if g]
    if not groups:
        return None
    n = max(len(v) for _, g in groups for v in g.values())
    x = epochs if epochs and len(epochs) == n else list(range(1, n + 1))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups) + 1, 4.4), squeeze=False)
    for ax, (title, group) in zip(axes[0], groups, strict=True):
        bases = sorted({k.removeprefix("val_") for k in group})
        for k, v in sorted(group.items()):
            color = f"C{bases.index(k.removeprefix('val_')) % 10}"  # train and val of a metric share a colour
            ax.plot(x[: len(v)], v, marker="o", ms=4, color=color, ls="--" if k.startswith("val_") else "-",
                    label=k)
        ax.set(xlabel="epoch", title=f"Training {title}")
        if n <= 20:
            ax.set_xticks(x)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ddd;padding:.3em .7em}
th{background:#f4f4f4;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:.4em 0} .ok{color:#1a7f37;font-weight:bold}
.bad{color:#c62828;font-weight:bold} .muted{color:#777;font-size:.88em}
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="n">{_fmt(c)}</td>' if isinstance(c, int | float) and not isinstance(c, bool)
            else f"<td>{_fmt(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, Mapping[str, Any]] | None,
                   champion: Mapping[str, Any] | None = None,
                   gbt: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    cols: list[tuple[str, Mapping[str, Any]]] = []
    for split in ("val", "test"):
        if split in metrics:
            cols.append((f"model {split}", metrics[split]))
        if baseline and split in baseline:
            cols.append((f"baseline {split}", baseline[split]))
        if gbt and split in gbt:
            cols.append((f"GBT baseline {split}", gbt[split]))
    if champion:
        cols.append(("champion test", champion))
    names = list(_TABLE_METRICS)
    for _, m in cols:
        names += [k for k in m if (k.startswith(("recall_at_fpr_", "precision_at_"))) and k not in names]
    names += ["rows", "positives", "base_rate", "auc_error_bound"]
    rows = [[n] + [m.get(n) for _, m in cols] for n in names]
    return _table(["metric"] + [c for c, _ in cols], rows)


def _baseline_section(versus: Mapping[str, Any] | None, who: str = "the baseline") -> str:
    """Model minus baseline per split on the headline metrics, and a warning where the model trails."""
    if not versus:
        return ""
    rows = [[f"{split} {k}", v.get("model"), v.get("baseline"), v.get("delta")]
            for split, per in (versus.get("splits") or {}).items() for k, v in per.items()]
    worse = versus.get("worse") or []
    verdict = (f"<p><span class='bad'>MODEL TRAILS {who.upper()}</span>: {html.escape('; '.join(worse))}</p>"
               if worse else f"<p><span class='ok'>not worse than {who}</span> "
               f"(within tolerance {html.escape(str(versus.get('tolerance')))})</p>")
    return (f"<h3>Model against {who}</h3>" + verdict
            + _table(["", "model", "baseline", "model - baseline"], rows))


def _decile_table(m: Mapping[str, Any]) -> str:
    rows = [[d["decile"], d["rows"], d["positives"], d["rate"], d["lift"], d["cumulative_gain"],
             d["cumulative_lift"], d["min_score"]] for d in m.get("deciles") or []]
    return _table(["decile", "rows", "positives", "rate", "lift", "cumulative gain", "cumulative lift",
                   "min score"], rows)


def _data_section(manifest: Mapping[str, Any] | None) -> str:
    if not manifest:
        return "<p class='muted'>No prepare manifest found.</p>"
    parts = []
    counts = manifest.get("counts") or {}
    parts.append(_table(["count", "rows"], [[k, v] for k, v in counts.items()]))
    reasons = manifest.get("quarantine_reasons") or {}
    if reasons:
        parts.append("<h3>Quarantine reasons</h3>")
        parts.append(_table(["reason", "rows"], sorted(([k, v] for k, v in reasons.items()),
                                                       key=lambda r: -r[1] if isinstance(r[1], int) else 0)))
    else:
        parts.append("<p>No row was quarantined.</p>")
    splits = manifest.get("splits") or {}
    if splits:
        rows = []
        for name in ("train", "val", "test"):
            s = splits.get(name) or {}
            n, p = s.get("rows"), s.get("positives")
            rate = p / n if isinstance(n, int) and isinstance(p, int) and n else None
            rows.append([name, n, p, rate, s.get("files"), s.get("row_groups")])
        parts.append("<h3>Splits</h3>")
        parts.append(_table(["split", "rows", "positives", "positive rate", "files", "row groups"], rows))
    dv = manifest.get("data_version")
    if dv:
        parts.append(f"<p class='muted'>data version {html.escape(str(dv))}</p>")
    return "\n".join(parts)


def plot_decision(curve: Any, decision: Mapping[str, Any], path: Path) -> str:
    """Cost on val against the share of rows acted on, the chosen point, and test's point at that threshold."""
    import numpy as np

    rate = curve.acted / max(curve.rows, 1)
    idx = np.unique(np.concatenate([np.linspace(0, len(rate) - 1, 2000).astype(int), [len(rate) - 1]]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(rate[idx], curve.cost[idx], color=_COLORS["model"], label="cost on val, by threshold")
    ax.axhline(curve.missed_total, color=_COLORS["random"], linestyle=":", label="no action (val)")
    val = decision["val"]
    ax.scatter([val["action_rate"]], [val["cost"]], color="#d62728", zorder=3, label="chosen on val")
    if decision.get("test"):
        t = decision["test"]
        ax.scatter([t["action_rate"]], [t["cost"]], color="#d62728", marker="x", zorder=3,
                   label="same threshold on test")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("share of rows acted on")
    ax.set_ylabel("total cost")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _decision_section(decision: Mapping[str, Any] | None, png: str | None) -> str:
    if not decision:
        return ("<p class='muted'>No decision threshold (set <code>evaluation.decision.enabled</code> and its "
                "costs to choose one on val).</p>")
    c = decision.get("costs") or {}
    missed = decision.get("missed_cost_column") or c.get("missed")
    budget = decision.get("max_action_rate")
    intro = (f"<p>Act on a row when its score is at least the threshold, chosen on val to minimise: "
             f"{_fmt(c.get('action'))} per row acted on + {_fmt(c.get('false_positive'))} per negative acted on "
             f"+ the missed cost ({html.escape(str(missed))}) of each positive not acted on"
             + (f", acting on at most {budget:.4%} of rows" if budget else "")
             + ". Test shows the same threshold on rows it was not chosen on. A threshold of &ndash; means "
             "acting on no row is cheapest.</p>")
    splits = [s for s in ("val", "test") if decision.get(s)]
    rows = [[k, *[decision[s].get(k) for s in splits]] for k in _DECISION_ROWS]
    img = f'<img src="{png}" alt="cost by threshold">' if png else ""
    return intro + _table(["", *splits], rows) + img


def _gate_section(gate: Mapping[str, Any] | None) -> str:
    if not gate:
        return "<p class='muted'>The quality gate was not run (use <code>downpour evaluate --gate</code>).</p>"
    cls = "ok" if gate.get("promoted") else "bad"
    verdict = "PROMOTED" if gate.get("promoted") else "REFUSED"
    return f"<p><span class='{cls}'>{verdict}</span>: {html.escape(str(gate.get('reason', '')))}</p>"


def write_report(out_dir: str | Path, *, metrics: Mapping[str, Mapping[str, Any]],
                 baseline: Mapping[str, Mapping[str, Any]] | None = None,
                 gbt: Mapping[str, Mapping[str, Any]] | None = None,
                 model_card: Mapping[str, Any] | None = None, manifest: Mapping[str, Any] | None = None,
                 history: Any = None, gate: Mapping[str, Any] | None = None,
                 champion: Mapping[str, Any] | None = None, decision: Mapping[str, Any] | None = None,
                 decision_curve: Any = None) -> Path:
    """Render ``report.html`` and its PNGs into ``out_dir``; returns the HTML path.

    ``metrics``/``baseline``/``gbt`` map a split (``val``, ``test``) to the dict of ``metrics.evaluate_scores``;
    ``champion`` is the current champion's on the same test split (when the gate compared them);
    ``decision`` is the model card's ``decision`` and ``decision_curve`` its val cost curve.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = model_card or {}
    with timed(f"report -> {out}"):
        series = _series(metrics, baseline, champion, gbt)
        imgs = {
            "roc": plot_roc(series, out / "roc.png"),
            "pr": plot_pr(series, out / "pr.png"),
            "gains": plot_gains(series, out / "gains.png"),
            "calibration": plot_calibration(series, out / "calibration.png"),
        }
        main_split = "test" if "test" in metrics else next(iter(metrics), None)
        if main_split:
            imgs["scores"] = plot_scores(metrics[main_split], out / "scores.png", main_split)
        training_png = plot_training(history, out / "training.png") if history else None
        decision_png = (plot_decision(decision_curve, decision, out / "decision.png")
                        if decision and decision_curve is not None else None)

        name = card.get("name", "model")
        tr = card.get("training") or {}
        summary_rows = [["model", name], ["model version", card.get("model_version")],
                        ["data version", card.get("data_version")]]
        summary_rows += [[f"training {k}", tr[k]] for k in _TRAINING_SUMMARY if tr.get(k) is not None]
        img = lambda key, alt: (f'<img src="{imgs[key]}" alt="{alt}">' if key in imgs else "")  # noqa: E731
        body = [
            f"<h1>Evaluation report: {html.escape(str(name))}</h1>",
            f"<p class='muted'>generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>",
            "<h2 id='summary'>Summary</h2>", _table(["", ""], summary_rows),
            "<h3>Quality gate</h3>", _gate_section(gate),
            "<h2 id='metrics'>Metrics</h2>",
            "<p class='muted'>Baseline: logistic regression (Spark ML) on the same features, fitted on "
            "train" + ("; GBT baseline: gradient-boosted trees (Spark ML) on a sample of train" if gbt else "")
            + ". recall_at_fpr_X: recall at the lowest threshold whose false-positive rate is at most X.</p>",
            _metrics_table(metrics, baseline, champion, gbt),
            _baseline_section(card.get("vs_baseline")),
            _baseline_section(card.get("vs_baseline_gbt"), "the GBT baseline"),
            "<h2 id='decision'>Decision</h2>", _decision_section(decision, decision_png),
            "<h2 id='roc'>ROC</h2>", img("roc", "ROC curves"),
            "<h2 id='pr'>Precision-recall</h2>", img("pr", "precision-recall curves"),
            "<h2 id='gains'>Lift and cumulative gains</h2>", img("gains", "lift and gains"),
        ]
        if main_split:
            body += [f"<h3>Deciles ({main_split}, model)</h3>", _decile_table(metrics[main_split])]
        body += [
            "<h2 id='calibration'>Calibration</h2>", img("calibration", "calibration"),
            "<h2 id='scores'>Score distributions</h2>", img("scores", "score distribution per class"),
            "<h2 id='training'>Training curves</h2>",
            f'<img src="{training_png}" alt="training curves">' if training_png
            else "<p class='muted'>No training history found.</p>",
            "<h2 id='data'>Data</h2>", _data_section(manifest),
        ]
        doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
               f"<title>{html.escape(str(name))}: evaluation</title><style>{_CSS}</style></head><body>"
               + "\n".join(body) + "</body></html>")
        path = out / REPORT_HTML
        tmp = out / f".{REPORT_HTML}.tmp"
        tmp.write_text(doc, encoding="utf-8")
        tmp.replace(path)
    return path
