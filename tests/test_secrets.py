"""No credential from the environment reaches an artifact: model card, MLflow run, log file.

The config below takes an S3 secret key (``spark.conf``) and an MLflow token (userinfo of
``tracking.mlflow_uri``) from ``${ENV}``; the model card is written by training's own ``finish`` and
the MLflow run by ``tracking.log_evaluation``; then every file written is scanned for the two values.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from downpour import config as config_mod
from downpour import tracking
from downpour.config import REDACTED, Config, load_config
from downpour.logs import LOG

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3a-secret-5b0e2c9f41"     # $DOWNPOUR_TEST_S3_SECRET
TOKEN = "mlflow-token-77d1a4c0"      # $DOWNPOUR_TEST_MLFLOW_TOKEN
LITERAL_PW = "literal-pw-0c61e2"     # written into the config itself (a URL password)
SECRET_KEY = "spark.hadoop.fs.s3a.secret.key"


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("DOWNPOUR_TEST_S3_SECRET", SECRET)
    monkeypatch.setenv("DOWNPOUR_TEST_MLFLOW_TOKEN", TOKEN)
    conf = json.dumps({
        SECRET_KEY: "${DOWNPOUR_TEST_S3_SECRET}",                        # redacted by key
        "spark.driver.extraJavaOptions": "-Ds3.k=${DOWNPOUR_TEST_S3_SECRET}",  # kept as its template
        "spark.downpour.note": SECRET,                                  # a copy: scrubbed by value
        "spark.sql.shuffle.partitions": 4,
    })
    return load_config(ROOT / "conf" / "crm_telco.yaml", [
        f"output.path={tmp_path / 'out'}", f"spark.conf={conf}",
        # a port on loopback where nothing listens: refused at once (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0)
        "tracking.mlflow_uri=http://ci:${DOWNPOUR_TEST_MLFLOW_TOKEN}@127.0.0.1:9/mlflow",
        f"input.path=s3a://AKIAEXAMPLE:{LITERAL_PW}@bucket/raw/telco.csv",
    ])


def _leaks(root: Path, *needles: str) -> list[str]:
    """'<file>: <needle>' for every file under ``root`` whose bytes hold a needle (hidden ones too)."""
    found = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            data = Path(dirpath, name).read_bytes()
            found += [f"{Path(dirpath, name).relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return sorted(found)


class _Rank0(dict):
    """What rank 0 reports to the driver; keys this test does not care about read as None."""

    def __missing__(self, key: str) -> Any:
        return None


def _write_model_card(cfg: Config, tmp_path: Path) -> Path:
    """Training's ``finish`` (the real writer of model_card.json and history.json), minus the training."""
    from downpour import storage
    from downpour.layout import RunLayout
    from downpour.training import train
    from downpour.training.input import PreparedData

    staging = storage.staging_dir(RunLayout(cfg.output.path).model)
    from downpour.training.budget import plan_budget
    from downpour.training.input import SplitInfo
    from downpour.training.plan import RankPlan

    split = SplitInfo(name="train", url=str(tmp_path / "train"), rows=10, positives=3, row_groups=2, files=2)
    plan = RankPlan(config={}, prepared_url=str(tmp_path / "prepared"), data_version="dv1", feature_state={},
                    train=split, val=split, steps_per_epoch=3, keep_negatives=1.0, positive_weight=1.0,
                    logit_shift=0.0, monitor="val_auc", checkpoints=str(tmp_path / "checkpoints"),
                    tensorboard=str(tmp_path / "no-tensorboard"), staging=staging, run_key="k",
                    budget=plan_budget(cfg.training, 10), fresh=True)
    rank0 = _Rank0(weights_sha256="w", history=[{"epoch": 0, "loss": 0.5, "examples_per_s": 10.0}],
                   initial_epoch=0, epochs_completed=1, signatures={}, frameworks={})
    prepared = PreparedData(url=str(tmp_path / "prepared"), manifest={"data_version": "dv1"},
                            feature_state={"raw_inputs": {}})
    train.finish(cfg, prepared, plan, [rank0])
    return Path(cfg.output.path) / "model" / "model_card.json"


def _run_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, dict[str, Any]]:
    """Public dict, model card, a failed and a successful MLflow run, all logs into a file."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = _config(tmp_path, monkeypatch)
    public = cfg.to_public_dict()
    (tmp_path / "public.json").write_text(json.dumps(public))
    handler = logging.FileHandler(tmp_path / "downpour.log")
    handler.setLevel(logging.DEBUG)
    LOG.addHandler(handler)
    level = LOG.level
    LOG.setLevel(logging.DEBUG)
    try:
        card = json.loads(_write_model_card(cfg, tmp_path).read_text())
        assert tracking.log_evaluation(cfg) is None  # the server with the token is unreachable: logged
        if importlib.util.find_spec("mlflow") is not None:
            store = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
                update={"mlflow_uri": (tmp_path / "mlruns").as_uri()})})
            assert tracking.log_evaluation(store)
            assert any((tmp_path / "mlruns").rglob("model_card.json"))
    finally:
        LOG.setLevel(level)
        LOG.removeHandler(handler)
        handler.close()
    return cfg, card


def test_no_env_secret_in_public_dict_model_card_mlflow_or_logs(tmp_path, monkeypatch):
    cfg, card = _run_everything(tmp_path, monkeypatch)
    assert cfg.spark.conf[SECRET_KEY] == SECRET  # the running config still has the real values
    log = (tmp_path / "downpour.log").read_text()
    assert "could not log model" in log and "127.0.0.1:9" in log  # the scan below sees the log lines
    recorded = card["config"]
    assert recorded["spark"]["conf"][SECRET_KEY] == REDACTED
    assert recorded["spark"]["conf"]["spark.driver.extraJavaOptions"] == "-Ds3.k=${DOWNPOUR_TEST_S3_SECRET}"
    assert recorded["spark"]["conf"]["spark.downpour.note"] == REDACTED
    assert recorded["spark"]["conf"]["spark.sql.shuffle.partitions"] == 4
    assert recorded["tracking"]["mlflow_uri"] == "http://ci:${DOWNPOUR_TEST_MLFLOW_TOKEN}@127.0.0.1:9/mlflow"
    assert recorded["input"]["path"] == f"s3a://AKIAEXAMPLE:{REDACTED}@bucket/raw/telco.csv"
    assert recorded == json.loads((tmp_path / "public.json").read_text())
    assert _leaks(tmp_path, SECRET, TOKEN, LITERAL_PW) == []


def test_the_scan_finds_a_secret_when_redaction_is_off(tmp_path, monkeypatch):
    """The check above can fail: with the public view and the scrubbing as identity (the config as
    loaded, what was recorded before the fix), the secrets are found in the card and the log."""
    monkeypatch.setattr(config_mod, "public_view", lambda cfg, dump: dump)
    monkeypatch.setattr(Config, "scrub", lambda self, obj: obj)
    _run_everything(tmp_path, monkeypatch)
    leaks = _leaks(tmp_path, SECRET, TOKEN, LITERAL_PW)
    for found in (f"public.json: {SECRET}", f"downpour.log: {TOKEN}", f"public.json: {LITERAL_PW}"):
        assert found in leaks
    assert any(f.endswith(f"model_card.json: {SECRET}") for f in leaks)


def test_public_view_details(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWNPOUR_TEST_S3_SECRET", SECRET)
    monkeypatch.setenv("DOWNPOUR_TEST_SHORT", "2")
    cfg = load_config(ROOT / "conf" / "crm_telco.yaml", [
        "training.workers=${DOWNPOUR_TEST_SHORT}",
        "input.options={header: true, password: '${DOWNPOUR_TEST_S3_SECRET}', sep: ','}",
        "spark.conf={spark.executorEnv.DOWNPOUR_PII_SALT: pepper, spark.app.name: x}",
        f"tracking.mlflow_uri=https://h.example.com/x?sig=abc123def&token={SECRET}&v=1",
    ])
    public = cfg.to_public_dict()
    assert cfg.training.workers == 2 and public["training"]["workers"] == "${DOWNPOUR_TEST_SHORT}"
    assert public["training"]["batch_size"] == 128  # short values are not scrubbed out of other values
    assert public["input"]["options"] == {"header": True, "password": REDACTED, "sep": ","}
    assert public["spark"]["conf"] == {"spark.executorEnv.DOWNPOUR_PII_SALT": REDACTED, "spark.app.name": "x"}
    assert public["tracking"]["mlflow_uri"] == f"https://h.example.com/x?sig={REDACTED}&token={REDACTED}&v=1"
    # a value replaced after loading is recorded as it is now, not as the template it replaced
    moved = cfg.model_copy(update={"input": cfg.input.model_copy(update={"path": "/data/scoring.csv"})})
    assert moved.to_public_dict()["input"]["path"] == "/data/scoring.csv"
    assert cfg.to_public_dict()["input"]["path"].startswith("${DOWNPOUR_TELCO_PATH")
    # MLflow params come from the public view
    params = tracking.params_of(cfg, {"data_version": "d", "model_version": "m"})
    assert params["training.workers"] == "${DOWNPOUR_TEST_SHORT}" and SECRET not in json.dumps(params)
    assert cfg.scrub(f"connect to https://u:{SECRET}@h failed") == f"connect to https://u:{REDACTED}@h failed"
