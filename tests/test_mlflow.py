"""MLflow tracking (optional extra): what an evaluated model logs to a local file store, and when nothing is."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from downpour import tracking
from downpour.config import load_config
from downpour.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

CARD = {
    "name": "crm_telco", "model_version": "20240601T000000Z-abcd1234", "data_version": "d1",
    "metrics": {"val": {"roc_auc": 0.84, "pr_auc": 0.61, "rows": 1000, "precision@100": 0.7, "brier": None},
                "test": {"roc_auc": 0.83, "pr_auc": 0.60, "rows": 1000}},
    "baseline": {"test": {"roc_auc": 0.80, "pr_auc": float("nan")}},
    "baseline_gbt": {"test": {"roc_auc": 0.82}},
    "training": {"workers": 2, "epochs_completed": 2},
    "evaluation": {"gate": {"promoted": True, "reason": "model 20240601T000000Z-abcd1234 promoted: no champion yet"}},
}
HISTORY = {"epochs": [{"epoch": 0, "loss": 0.52, "auc": 0.78, "val_auc": 0.80, "examples_per_s": 9000.0},
                      {"epoch": 1, "loss": 0.45, "auc": 0.83, "val_auc": 0.84}]}


def _cfg(tmp_path: Path, *extra: str):
    return load_config(ROOT / "conf" / "crm_telco.yaml", [f"output.path={tmp_path / 'out'}", *extra])


def _evaluated_output(out: Path, card: dict | None = None) -> None:
    """The files `train` + `evaluate` leave under output.path (what tracking reads), without the cost."""
    model = out / "model"
    (model / "saved_model" / "variables").mkdir(parents=True)
    (model / "saved_model" / "saved_model.pb").write_bytes(b"\x08\x01")
    (model / "saved_model" / "variables" / "variables.index").write_bytes(b"idx")
    (model / "model_card.json").write_text(json.dumps(card or CARD))
    (model / "history.json").write_text(json.dumps(HISTORY))
    (out / "report").mkdir(parents=True)
    (out / "report" / "report.html").write_text("<html>report</html>")
    (out / "report" / "roc.png").write_bytes(b"\x89PNG")


def test_metrics_params_curves_from_the_card(tmp_path):
    metrics = tracking.metrics_of(CARD)
    assert metrics["val_roc_auc"] == 0.84 and metrics["test_pr_auc"] == 0.60
    assert metrics["baseline_test_roc_auc"] == 0.80 and "baseline_test_pr_auc" not in metrics  # NaN dropped
    assert metrics["baseline_gbt_test_roc_auc"] == 0.82
    assert metrics["val_precision_at_100"] == 0.7 and "val_brier" not in metrics
    params = tracking.params_of(_cfg(tmp_path), CARD)
    assert params["training.workers"] == "2" and params["model_version"] == CARD["model_version"]
    assert params["config_fingerprint"] and all(len(v) <= 500 for v in params.values())
    curves = tracking.curves_of(HISTORY)
    assert ("train_val_auc", 0.84, 1) in curves and ("train_loss", 0.52, 0) in curves


def test_disabled_without_uri_and_config_error_without_mlflow(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert not tracking.enabled(cfg) and tracking.log_evaluation(cfg) is None
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        tracking.check(_cfg(tmp_path, f"tracking.mlflow_uri={(tmp_path / 'mlruns').as_uri()}"))


def test_logs_params_metrics_report_and_model_to_a_file_store(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(tmp_path, f"tracking.mlflow_uri={uri}")
    _evaluated_output(Path(cfg.output.path))
    run_id = tracking.log_evaluation(cfg)
    assert run_id

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "downpour-crm_telco"
    assert run.data.params["training.epochs"] == str(cfg.training.epochs)
    assert run.data.params["data_version"] == "d1"
    assert run.data.metrics["test_roc_auc"] == 0.83
    assert run.data.tags["downpour.model_version"] == CARD["model_version"]
    assert run.data.tags["downpour.gate"] == "promoted"
    assert [m.value for m in client.get_metric_history(run_id, "train_val_auc")] == [0.80, 0.84]
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"model_card.json", "history.json", "report", "model"} <= artifacts
    assert {f.path for f in client.list_artifacts(run_id, "report")} == {"report/report.html", "report/roc.png"}
    model_files = {f.path for f in client.list_artifacts(run_id, "model/saved_model")}
    assert "model/saved_model/saved_model.pb" in model_files

    # Evaluating the same model again (now refused) updates its run instead of adding one.
    refused = {**CARD, "evaluation": {"gate": {"promoted": False, "reason": "refused: worse than champion"}}}
    (Path(cfg.output.path) / "model" / "model_card.json").write_text(json.dumps(refused))
    assert tracking.log_evaluation(cfg) == run_id
    run = client.get_run(run_id)
    assert run.data.tags["downpour.gate"] == "refused"
    assert "worse than champion" in run.data.tags["downpour.gate_reason"]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert mlflow.get_tracking_uri() == uri


def test_model_left_out_when_log_model_is_false(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(tmp_path, f"tracking.mlflow_uri={uri}", "tracking.log_model=false", "tracking.experiment=churn")
    _evaluated_output(Path(cfg.output.path))
    run_id = tracking.log_evaluation(cfg)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == "churn"
    assert "model" not in {f.path for f in client.list_artifacts(run_id)}


def test_unreachable_tracking_server_does_not_fail_the_evaluation(tmp_path, caplog, monkeypatch):
    pytest.importorskip("mlflow")
    from downpour.logs import LOG

    # A port on loopback where nothing listens: the connection is refused at once, no retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(LOG, "propagate", True)
    cfg = _cfg(tmp_path, "tracking.mlflow_uri=http://127.0.0.1:9")
    _evaluated_output(Path(cfg.output.path))
    with caplog.at_level(logging.ERROR, logger="downpour"):
        assert tracking.log_evaluation(cfg) is None
    assert "could not log model" in caplog.text
