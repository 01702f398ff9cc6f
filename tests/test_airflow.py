"""The retraining DAG in real Apache Airflow 3 (its own venv, .venv-airflow), and the jobs it runs.

The Airflow tests install Airflow with `make airflow-venv` (idempotent; pip's cache makes a re-install
fast), use an AIRFLOW_HOME in tmp with a sqlite metadata DB, and a Spark connection to local[2].
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_BIN = ROOT / ".venv-airflow" / "bin"
USE_CASES = {"fraud": "@daily", "crm_telco": "@weekly"}
TINY = ["training.epochs=1", "training.workers=2", "evaluation.baseline=false"]
CONN_ID = "spark_downpour_test"


# ---- the jobs the DAG runs (project venv; no Airflow needed) -------------------------------------------
def _run_job(script: str, argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "jobs" / script), run_name="__main__")
    return exit_.value.code


@pytest.mark.parametrize(("refusal_ok", "expected"), [(True, 0), (False, 4)])
def test_evaluate_job_turns_a_refusal_into_a_recorded_decision_only_when_asked(refusal_ok, expected, monkeypatch):
    import downpour.cli

    seen: list[list[str]] = []
    monkeypatch.setattr(downpour.cli, "main", lambda argv: seen.append(list(argv)) or 4)  # the gate refused
    argv = ["--conf", "c.yaml", "--gate", *(["--refusal-ok"] if refusal_ok else [])]
    assert _run_job("evaluate.py", argv, monkeypatch) == expected
    assert seen == [["evaluate", "--conf", "c.yaml", "--gate"]]


def _publish(cfg_overrides: list[str], capsys) -> tuple[int, dict]:
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import publish as job
    finally:
        sys.path.pop(0)
    code = job.main(["--conf", str(ROOT / "conf" / "crm_telco.yaml"), *[x for o in cfg_overrides
                                                                          for x in ("--set", o)], "--json"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return code, json.loads(lines[-1])


def _card(out: Path, version: str, gate: dict | None) -> None:
    model = out / "model"
    (model / "saved_model").mkdir(parents=True, exist_ok=True)
    card = {"name": "crm_telco", "model_version": version, "data_version": "d1"}
    if gate is not None:
        card["evaluation"] = {"gate": gate}
    (model / "model_card.json").write_text(json.dumps(card))


def test_publish_job_acts_on_the_gate_decision(tmp_path, capsys):
    from training.registry import Registry, decide, enforce

    out, registry = tmp_path / "out", tmp_path / "out" / "registry"
    _card(out, "v1", None)
    code, result = _publish([f"output.path={out}"], capsys)
    assert code == 3 and "no quality-gate decision" in result["reason"]

    # promoted: the registry's champion is this model
    decision = decide("roc_auc", 0.005, "v1", 0.84, None, None)
    enforce(Registry(registry), decision, out / "model", {"test": {"roc_auc": 0.84}})
    _card(out, "v1", {**asdict(decision), "registry": str(registry)})
    code, result = _publish([f"output.path={out}"], capsys)
    assert code == 0 and result["status"] == "published" and result["model_version"] == "v1"
    assert Path(result["model_dir"]).is_dir() and result["champion"]["model_version"] == "v1"

    # refused: exit 4 with the gate's reason; the champion stays
    refused = decide("roc_auc", 0.005, "v2", 0.70, "v1", 0.84)
    with pytest.raises(Exception, match="refused"):
        enforce(Registry(registry), refused, out / "model", {})
    _card(out, "v2", {**asdict(refused), "registry": str(registry)})
    code, result = _publish([f"output.path={out}"], capsys)
    assert code == 4 and result["status"] == "refused" and "0.7000 < champion v1" in result["reason"]
    assert Registry(registry).champion()["model_version"] == "v1"


# ---- Airflow -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    """.venv-airflow installed (make airflow-venv), an AIRFLOW_HOME in tmp, its sqlite DB migrated."""
    make = subprocess.run(["make", "-C", str(ROOT), "airflow-venv"], capture_output=True, text=True, timeout=1800)
    assert make.returncode == 0, f"make airflow-venv failed:\n{make.stdout[-3000:]}\n{make.stderr[-3000:]}"
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_GATEWAY", "AIRFLOW", "SPARK_HOME"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        "AIRFLOW_VAR_DOWNPOUR_SPARK_CONN_ID": CONN_ID,
        "DOWNPOUR_PYTHON": sys.executable,  # the project's interpreter runs the jobs
        "PYSPARK_PYTHON": sys.executable,
        "PATH": os.pathsep.join([str(AIRFLOW_BIN), env.get("PATH", "")]),
    })
    migrate = subprocess.run([str(AIRFLOW_BIN / "airflow"), "db", "migrate"], capture_output=True, text=True,
                             env=env, timeout=600)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return env


def _airflow_python(code: str, env: dict[str, str], timeout: float = 300) -> dict:
    proc = subprocess.run([str(AIRFLOW_BIN / "python"), "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


DAGBAG = """
import json
from airflow.models.dagbag import DagBag
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
bag = DagBag(dag_folder=%r, include_examples=False)
dags = {}
for dag_id, dag in bag.dags.items():
    dags[dag_id] = {
        "schedule": str(dag.schedule), "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
        "params": sorted(dag.params.keys()),
        "tasks": {t.task_id: {"downstream": sorted(t.downstream_task_ids), "retries": t.retries,
                              "spark_submit": isinstance(t, SparkSubmitOperator),
                              "application": getattr(t, "application", None),
                              "stage_args": getattr(t, "stage_args", None),
                              "outlets": [getattr(o, "uri", None) for o in t.outlets]}
                  for t in dag.tasks},
    }
print("RESULT " + json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": dags}))
"""


@pytest.mark.slow
def test_dag_imports_and_its_task_graph(airflow_env):
    info = _airflow_python(DAGBAG % str(ROOT / "dags"), airflow_env)
    assert info["errors"] == {}
    assert set(info["dags"]) == {f"downpour_retrain_{u}" for u in USE_CASES}
    for use_case, schedule in USE_CASES.items():
        dag = info["dags"][f"downpour_retrain_{use_case}"]
        assert dag["schedule"] == schedule and dag["catchup"] is False and dag["max_active_runs"] == 1
        assert dag["params"] == ["conf", "overrides", "spark_conf", "spark_conn_id"]
        tasks = dag["tasks"]
        assert {t: v["downstream"] for t, v in tasks.items()} == {
            "prepare": ["train"], "train": ["evaluate"], "evaluate": ["publish"], "publish": []}
        for stage in ("prepare", "train", "evaluate"):
            assert tasks[stage]["spark_submit"] and tasks[stage]["retries"] == 2
            assert Path(tasks[stage]["application"]) == ROOT / "jobs" / f"{stage}.py"
        assert tasks["evaluate"]["stage_args"] == ["--gate", "--refusal-ok"]
        assert not tasks["publish"]["spark_submit"]
        assert tasks["publish"]["outlets"] == [f"downpour://{use_case}/champion"]


@pytest.mark.slow
def test_refused_model_fails_publish_with_the_reason(airflow_env, tmp_path):
    out = tmp_path / "out"
    reason = "model v2 refused: test roc_auc 0.7000 < champion v1 0.8400 - tolerance 0.005"
    _card(out, "v2", {"promoted": False, "reason": reason, "registry": str(out / "registry")})
    proc = subprocess.run(
        [str(AIRFLOW_BIN / "airflow"), "tasks", "test", "downpour_retrain_crm_telco", "publish",
         "--task-params", json.dumps({"overrides": [f"output.path={out}"]})],
        capture_output=True, text=True, env=airflow_env, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert f"AirflowFailException: quality gate refused the model, nothing published: {reason}" in log
    assert "new_state=failed" in log


STATES = """
import json
from airflow.models import DagRun
from airflow.utils.session import create_session
with create_session() as s:
    runs = s.query(DagRun).filter(DagRun.dag_id == %r).all()
    out = [{"state": str(r.state), "tasks": {ti.task_id: str(ti.state) for ti in r.get_task_instances(session=s)}}
           for r in runs]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_dags_test_runs_the_pipeline_on_local_spark(airflow_env, telco_path, tmp_path):
    out = tmp_path / "out"
    overrides = [f"input.path={telco_path}", f"output.path={out}", *TINY]
    proc = subprocess.run(
        [str(AIRFLOW_BIN / "airflow"), "dags", "test", "downpour_retrain_crm_telco", "2024-06-03",
         "--conf", json.dumps({"overrides": overrides})],
        capture_output=True, text=True, env=airflow_env, timeout=1500, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    runs = _airflow_python(STATES % "downpour_retrain_crm_telco", airflow_env)
    assert len(runs) == 1, runs
    assert runs[0]["tasks"] == {t: "success" for t in ("prepare", "train", "evaluate", "publish")}, log[-6000:]
    assert runs[0]["state"] == "success"
    assert "--master local[2]" in log and str(ROOT / "jobs" / "train.py") in log  # spark-submit on the connection

    card = json.loads((out / "model" / "model_card.json").read_text())
    champion = json.loads((out / "registry" / "champion.json").read_text())
    assert card["evaluation"]["gate"]["promoted"] is True
    assert champion["model_version"] == card["model_version"]
    assert f"published model {card['model_version']} of crm_telco" in log
