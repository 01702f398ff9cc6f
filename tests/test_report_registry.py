"""The registry promotes/refuses by the gate and swaps its pointer atomically; the report renders."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
from pathlib import Path

import numpy as np
import pytest

from downpour.errors import ConfigError, DownpourError, GateRefused
from downpour.layout import CHAMPION
from downpour.training import metrics as M
from downpour.training import registry as R
from downpour.training.report import SECTIONS, history_series, write_report


def _model_dir(tmp: Path, version: str) -> Path:
    d = tmp / f"model_{version}"
    (d / "saved_model" / "variables").mkdir(parents=True)
    (d / "saved_model" / "saved_model.pb").write_bytes(b"pb-" + version.encode())
    (d / "model_card.json").write_text(json.dumps({"model_version": version}))
    return d


# ---- gate decision (pure) --------------------------------------------------------------------------

def test_decide_rules():
    first = R.decide("roc_auc", 0.005, "v1", 0.80, None, None)
    assert first.promoted and "no champion" in first.reason
    within = R.decide("roc_auc", 0.005, "v2", 0.797, "v1", 0.80)
    assert within.promoted
    worse = R.decide("roc_auc", 0.005, "v2", 0.70, "v1", 0.80)
    assert not worse.promoted
    assert "0.7000" in worse.reason and "0.8000" in worse.reason and "v1" in worse.reason
    assert R.decide("pr_auc", 0.0, "v2", 0.5, "v1", 0.5).promoted  # equal is not worse
    assert not R.decide("roc_auc", 0.0, "v2", float("nan"), None, None).promoted  # never promote blind


def test_the_baseline_rule_refuses_a_model_that_trails_the_baseline():
    first = R.decide("roc_auc", 0.005, "v1", 0.80, None, None)
    ok = R.against_baseline(first, 0.80, 0.805, 0.01)
    assert ok.promoted and ok.baseline_value == 0.805 and "LR baseline 0.8050" in ok.reason
    trails = R.against_baseline(first, 0.80, 0.83, 0.01)  # no champion to lose to, still refused
    assert not trails.promoted and "0.8000 < LR baseline 0.8300" in trails.reason and "vs_baseline" in trails.reason
    beaten = R.decide("roc_auc", 0.005, "v2", 0.70, "v1", 0.80)  # refused by both: both reasons kept
    both = R.against_baseline(beaten, 0.70, 0.75, 0.0)
    assert not both.promoted and "champion v1" in both.reason and "LR baseline 0.7500" in both.reason
    assert not R.against_baseline(first, 0.80, float("nan"), 0.01).promoted  # never promote blind
    assert not R.against_baseline(first, float("nan"), 0.80, 0.01).promoted
    kept = R.against_baseline(beaten, 0.70, 0.60, 0.0)  # beats the baseline, still loses to the champion
    assert not kept.promoted and kept.reason.startswith(beaten.reason)
    assert not R.against_baseline(first, 0.80, None, 0.01).promoted


# ---- registry --------------------------------------------------------------------------------------

def test_first_model_is_promoted_then_worse_one_refused(tmp_path):
    reg = R.Registry(tmp_path / "registry")
    assert reg.champion() is None
    m1 = _model_dir(tmp_path, "v1")
    d1 = R.decide("roc_auc", 0.005, "v1", 0.81, None, None)
    rec = R.enforce(reg, d1, m1, {"test": {"roc_auc": 0.81}})
    assert rec["model_version"] == "v1"
    assert reg.champion()["model_version"] == "v1"
    assert (reg.champion_model_dir() / "saved_model" / "saved_model.pb").read_bytes() == b"pb-v1"
    assert json.loads((reg.version_dir("v1") / "metrics.json").read_text())["test"]["roc_auc"] == 0.81

    m2 = _model_dir(tmp_path, "v2")
    d2 = R.decide("roc_auc", 0.005, "v2", 0.60, "v1", 0.81)
    with pytest.raises(GateRefused) as exc:
        R.enforce(reg, d2, m2, {"test": {"roc_auc": 0.60}})
    assert exc.value.exit_code == 4
    assert "0.6000" in str(exc.value) and "0.8100" in str(exc.value)
    assert reg.champion()["model_version"] == "v1"          # pointer untouched
    assert not reg.version_dir("v2").exists()               # refused models are not registered

    m3 = _model_dir(tmp_path, "v3")
    R.enforce(reg, R.decide("roc_auc", 0.005, "v3", 0.83, "v1", 0.81), m3, {"test": {"roc_auc": 0.83}})
    champ = reg.champion()
    assert champ["model_version"] == "v3" and champ["previous"] == "v1"
    hist = reg.history()
    assert [(h["model_version"], h["promoted"]) for h in hist] == [("v1", True), ("v2", False), ("v3", True)]
    assert hist[1]["champion_value"] == 0.81


def test_promotion_refuses_a_stale_comparison(tmp_path):
    reg = R.Registry(tmp_path / "r")
    R.enforce(reg, R.decide("roc_auc", 0, "v1", 0.8, None, None), _model_dir(tmp_path, "v1"), {})
    # v2 was compared with "no champion", but v1 was promoted meanwhile: the swap must not happen
    stale = R.decide("roc_auc", 0, "v2", 0.7, None, None)
    with pytest.raises(DownpourError, match="champion changed"):
        R.enforce(reg, stale, _model_dir(tmp_path, "v2"), {})
    assert reg.champion()["model_version"] == "v1"


def _reader(root: str, n: int, q: mp.Queue) -> None:
    seen, errors = set(), 0
    for _ in range(n):
        try:
            seen.add(json.loads((Path(root) / CHAMPION).read_text())["model_version"])
        except (json.JSONDecodeError, KeyError, FileNotFoundError):
            errors += 1
    q.put((sorted(seen), errors))


def test_pointer_swap_is_atomic_under_concurrent_reads(tmp_path):
    """A reader polling champion.json while it is rewritten never sees a partial or missing file."""
    root = tmp_path / "reg"
    R.write_json_atomic(root / CHAMPION, {"model_version": "v0", "pad": "x" * 20000})
    q: mp.Queue = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_reader, args=(str(root), 4000, q))
    p.start()
    for i in range(400):
        R.write_json_atomic(root / CHAMPION, {"model_version": f"v{i % 2}", "pad": "x" * 20000})
    p.join(60)
    seen, errors = q.get(timeout=10)
    assert errors == 0 and set(seen) <= {"v0", "v1"}
    assert not [f for f in root.iterdir() if f.name.startswith(".")]  # no temp files left behind


def test_register_is_idempotent_and_missing_champion_dir_is_reported(tmp_path):
    reg = R.Registry(tmp_path / "r")
    m = _model_dir(tmp_path, "v1")
    reg.register(m, "v1", {"a": 1})
    reg.register(m, "v1", {"a": 2})
    assert json.loads((reg.version_dir("v1") / "metrics.json").read_text()) == {"a": 2}
    with pytest.raises(DownpourError):
        reg.version_dir("../escape")
    R.write_json_atomic(reg.root / CHAMPION, {"model_version": "gone", "path": "versions/gone"})
    with pytest.raises(DownpourError, match="missing"):
        reg.champion()


def test_registry_paths(tmp_path):
    assert R.local_path("file:///x/y", "k") == Path("/x/y")
    # as Spark qualifies local paths (one slash), and with an authority: never a directory named "file:"
    assert R.local_path("file:/x/y", "k") == R.local_path("file://localhost/x/y", "k") == Path("/x/y")
    assert R.local_path("rel/reg", "k") == Path(os.path.abspath("rel/reg"))
    assert R.local_path("dbfs:/mnt/reg", "k") == Path("/dbfs/mnt/reg")
    with pytest.raises(ConfigError, match="evaluation.registry"):
        R.local_path("s3a://bucket/reg", "evaluation.registry")
    assert R.jsonable({"a": float("nan"), "b": [np.float32(1.5), float("inf")]}) == {"a": None, "b": [1.5, None]}


# ---- report ----------------------------------------------------------------------------------------

def _metrics(n: int, shift: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(float)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + shift * y - 1.3)))
    return M.full_metrics(M.table_from_arrays(y, s), [0.001, 0.01], [100, 500])


def test_report_renders_every_section(tmp_path):
    manifest = {
        "data_version": "dv1", "counts": {"input": 7043, "clean": 7032, "quarantined": 11, "duplicates": 0},
        "quarantine_reasons": {"TotalCharges: negative": 11},
        "splits": {"train": {"rows": 4900, "positives": 1300, "files": 2, "row_groups": 20},
                   "val": {"rows": 1060, "positives": 280, "files": 1, "row_groups": 5},
                   "test": {"rows": 1072, "positives": 290, "files": 1, "row_groups": 5}},
    }
    card = {"name": "crm_telco", "model_version": "mv1", "data_version": "dv1",
            "training": {"workers": 2, "epochs_completed": 3},
            "vs_baseline": {"tolerance": 0.005, "worse": ["test pr_auc 0.5000 < baseline 0.6000 (by 0.1000)"],
                            "splits": {"test": {"pr_auc": {"model": 0.5, "baseline": 0.6, "delta": -0.1}}}}}
    history = [{"epoch": 0, "loss": 0.6, "val_loss": 0.55, "val_auc": 0.7},
               {"epoch": 1, "loss": 0.5, "val_loss": 0.5, "val_auc": 0.8}]
    path = write_report(tmp_path / "report", metrics={"val": _metrics(2000, 1.8, 1), "test": _metrics(2000, 1.8, 2)},
                        baseline={"val": _metrics(2000, 1.0, 3), "test": _metrics(2000, 1.0, 4)},
                        model_card=card, manifest=manifest, history=history,
                        gate={"promoted": False, "reason": "model mv1 refused: test roc_auc 0.7 < 0.8"},
                        champion=_metrics(2000, 2.2, 6))
    doc = path.read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in doc, section
    for png in ("roc", "pr", "gains", "calibration", "scores", "training"):
        f = path.parent / f"{png}.png"
        assert f.stat().st_size > 5000 and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{png}.png"' in doc
    for text in ("baseline test", "model val", "champion test", "recall_at_fpr_0.001", "precision_at_100",
                 "TotalCharges: negative", "REFUSED", "mv1", "7,043", "MODEL TRAILS THE BASELINE",
                 "test pr_auc 0.5000 &lt; baseline 0.6000"):
        assert text in doc, text
    assert not re.search(r"<script|https?://", doc)  # self-contained: no scripts, nothing fetched


def test_report_without_optional_inputs(tmp_path):
    path = write_report(tmp_path, metrics={"test": _metrics(500, 1.0, 5)})
    doc = path.read_text()
    assert "No training history" in doc and "No prepare manifest" in doc and "not run" in doc
    assert not (tmp_path / "training.png").exists()


def test_history_formats():
    assert history_series({"loss": [1, 2], "val_auc": [0.5, 0.6]}) == {"loss": [1, 2], "val_auc": [0.5, 0.6]}
    assert history_series([{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]) == {"epoch": [1, 2],
                                                                                  "loss": [1.0, 0.5]}
    assert history_series({"epochs": [{"loss": 1.0}]}) == {"loss": [1.0]}
