"""The Databricks notebook: valid source format, and it runs end to end (cells in order) on the test session."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import functions as F

from downpour.pipelines.ingest import salted_hash

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "downpour_walkthrough.py"
HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"


def cells(source: str) -> list[tuple[str, str]]:
    """[(kind, text)] with kind 'md', 'magic' (another %magic: not run here) or 'python', in order."""
    lines = source.splitlines()
    assert lines[0] == HEADER
    out = []
    for chunk in "\n".join(lines[1:]).split(f"\n{SEPARATOR}\n"):
        text = chunk.strip("\n")
        body = [ln for ln in text.splitlines() if ln.strip()]
        if body and all(ln.startswith("# MAGIC") for ln in body):
            out.append(("md" if body[0].startswith("# MAGIC %md") else "magic", text))
        else:
            out.append(("python", text))
    return out


class Widgets:
    """What a Databricks job or the widget bar gives the notebook: declared widgets, values set by the caller."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = dict(values)
        self.declared: dict[str, str] = {}

    def _declare(self, name: str, default: str, *_: Any) -> None:
        self.declared[name] = default
        self.values.setdefault(name, default)

    text = _declare

    def dropdown(self, name: str, default: str, choices: list[str], label: str = "") -> None:
        assert default in choices
        if name in self.values:
            assert self.values[name] in choices, f"{name}={self.values[name]!r} not in {choices}"
        self._declare(name, default)

    def get(self, name: str) -> str:
        if name not in self.declared:
            raise ValueError(f"widget {name!r} was read before it was declared")
        return self.values[name]


class Secrets:
    def get(self, scope: str, key: str) -> str:
        raise AssertionError("the test provides DOWNPOUR_PII_SALT; the notebook must not need the secret")


class DBUtils:
    def __init__(self, values: dict[str, str]) -> None:
        self.widgets = Widgets(values)
        self.secrets = Secrets()


def test_notebook_is_databricks_source_format():
    source = NOTEBOOK.read_text()
    parsed = cells(source)
    assert source.startswith(HEADER + "\n")
    assert parsed[0][0] == "md" and parsed[-1][0] == "md"
    kinds = [k for k, _ in parsed]
    assert kinds.count("python") >= 6 and "magic" not in kinds
    for i, (kind, text) in enumerate(parsed):
        if kind == "python":
            compile(text, f"{NOTEBOOK.name}[cell {i}]", "exec")
    code = "\n".join(t for k, t in parsed if k == "python")
    assert "SparkSession.builder" not in code and "get_spark" not in code  # uses the `spark` it is given
    for call in ("api.prepare(", "api.train(", "api.evaluate(", "api.score(", "dbutils.widgets.get("):
        assert call in code


@pytest.mark.slow
def test_notebook_runs_end_to_end(spark, telco_path, tmp_path):
    displayed: list[Any] = []
    mlruns = tmp_path / "mlruns"
    try:
        import mlflow  # noqa: F401

        mlflow_uri = mlruns.as_uri()
    except ImportError:
        mlflow_uri = ""
    dbutils = DBUtils({"use_case": "crm_telco", "input_path": str(telco_path), "output_path": str(tmp_path),
                       "epochs": "1", "workers": "2", "mlflow_uri": mlflow_uri})
    namespace: dict[str, Any] = {"spark": spark, "dbutils": dbutils, "display": displayed.append,
                                 "__name__": "__main__"}
    for i, (kind, text) in enumerate(cells(NOTEBOOK.read_text())):
        if kind == "python":
            exec(compile(text, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)  # noqa: S102

    assert set(dbutils.widgets.declared) >= {"use_case", "conf", "input_path", "output_path", "epochs"}
    manifest, card = namespace["manifest"], namespace["card"]
    assert manifest["counts"]["input"] == 7043
    assert card["training"]["workers"] == 2 and card["training"]["epochs_completed"] == 1
    gate = namespace["gate"]
    assert gate["promoted"] is True, gate  # a fresh registry: the first model becomes the champion
    assert namespace["evaluation"]["metrics"]["test"]["roc_auc"] > 0.6

    scores = spark.read.parquet(namespace["scores_url"])
    assert {"customerID", "score", "model_version"} <= set(scores.columns)  # the id column is required
    rows = scores.select("customerID", "model_version").collect()
    assert 0 < len(rows) <= 7043
    # each id is the PII hash (pii.hash, keyed by the salt) of a raw customerID, never the raw id itself,
    # one row per customer
    with open(telco_path, newline="") as f:
        raw_ids = [r["customerID"].strip() for r in csv.DictReader(f)]
    raw = spark.createDataFrame([(i,) for i in raw_ids], "id string")
    salt = os.environ["DOWNPOUR_PII_SALT"]
    hashed = {r[0] for r in raw.select(salted_hash(F.col("id"), salt)).collect()}
    ids = [r["customerID"] for r in rows]
    assert len(set(ids)) == len(ids) and set(ids) <= hashed, ids[:3]
    assert not set(ids) & set(raw_ids)
    assert {r["model_version"] for r in rows} == {card["model_version"]}
    assert len(displayed) >= 4 and all(hasattr(d, "columns") for d in displayed)  # DataFrames shown
    card_file = json.loads((tmp_path / "crm_telco" / "model" / "model_card.json").read_text())
    assert card_file["model_version"] == card["model_version"]

    if mlflow_uri:  # tracking.mlflow_uri from the widget: the evaluated model is in MLflow
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri)
        (experiment,) = [e for e in client.search_experiments() if e.name == "downpour-crm_telco"]
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.data.tags["downpour.model_version"] == card["model_version"]
        assert run.data.tags["downpour.gate"] == "promoted"
        assert run.data.metrics["test_roc_auc"] == pytest.approx(namespace["evaluation"]["metrics"]["test"]["roc_auc"])
