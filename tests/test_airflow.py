"""The retraining and scoring DAGs in real Apache Airflow 3 (its own venv, .venv-airflow), and the jobs
the retraining DAG runs.

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
    from downpour.training.registry import Registry, decide, enforce

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


# parsed as the DAG processor does: the bundle's root (dags/) is on sys.path, for dags/downpour_common.py
DAGBAG = """
import json
from pathlib import Path
from airflow.models.dagbag import BundleDagBag
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
folder = Path(%r)
bag = BundleDagBag(dag_folder=folder, bundle_path=folder)
dags = {}
for dag_id, dag in bag.dags.items():
    assets = getattr(dag.timetable, "asset_condition", None)
    dags[dag_id] = {
        "schedule": str(dag.schedule), "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
        "timetable": dag.timetable.summary, "assets": [a.uri for _, a in assets.iter_assets()] if assets else [],
        "params": sorted(dag.params.keys()),
        "tasks": {t.task_id: {"downstream": sorted(t.downstream_task_ids), "retries": t.retries,
                              "spark_submit": isinstance(t, SparkSubmitOperator),
                              "application": getattr(t, "application", None),
                              "stage_args": getattr(t, "stage_args", None),
                              "inlets": [getattr(o, "uri", None) for o in t.inlets],
                              "outlets": [getattr(o, "uri", None) for o in t.outlets]}
                  for t in dag.tasks},
    }
print("RESULT " + json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": dags}))
"""


@pytest.fixture(scope="module")
def dags_info(airflow_env) -> dict:
    """Every DAG in dags/ as Airflow parsed it (schedule, params, tasks), and the import errors."""
    return _airflow_python(DAGBAG % str(ROOT / "dags"), airflow_env)


@pytest.mark.slow
def test_dag_imports_and_its_task_graph(dags_info):
    info = dags_info
    assert info["errors"] == {}
    assert set(info["dags"]) == {f"downpour_{kind}_{u}" for kind in ("retrain", "score") for u in USE_CASES}
    for use_case in USE_CASES:
        dag = info["dags"][f"downpour_retrain_{use_case}"]
        # its period, or a scoring run that found drift
        assert dag["timetable"] == f"Asset or {SCORE_CRON[use_case]}", dag["timetable"]
        assert dag["assets"] == [f"downpour://{use_case}/drift"]
        assert dag["catchup"] is False and dag["max_active_runs"] == 1
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


# ---- the scoring DAG (dags/downpour_score.py) --------------------------------------------------------------
SCORE_CRON = {"fraud": "0 0 * * *", "crm_telco": "0 0 * * 0"}


@pytest.mark.slow
def test_scoring_dag_runs_on_each_new_champion_and_each_period(dags_info):
    assert dags_info["errors"] == {}
    for use_case, cron in SCORE_CRON.items():
        dag = dags_info["dags"][f"downpour_score_{use_case}"]
        champion = dags_info["dags"][f"downpour_retrain_{use_case}"]["tasks"]["publish"]["outlets"]
        assert champion == [f"downpour://{use_case}/champion"]
        assert dag["assets"] == champion and dag["timetable"] == f"Asset or {cron}"
        assert dag["catchup"] is False and dag["max_active_runs"] == 1
        assert dag["params"] == sorted(["conf", "overrides", "spark_conn_id", "spark_conf", "input", "output",
                                        "history_store", "model"])
        assert list(dag["tasks"]) == ["score", "drift"]
        score, drift = dag["tasks"]["score"], dag["tasks"]["drift"]
        assert score["spark_submit"] and score["retries"] == 2 and score["downstream"] == ["drift"]
        # the drift task emits what the retraining DAG is scheduled on
        retrain = dags_info["dags"][f"downpour_retrain_{use_case}"]
        assert not drift["spark_submit"] and drift["outlets"] == retrain["assets"] == [f"downpour://{use_case}/drift"]
        assert Path(score["application"]) == ROOT / "jobs" / "score.py"
        assert score["inlets"] == champion  # where a scheduled run finds the latest champion


EMIT_CHAMPION = """
import json
from airflow.assets.manager import AssetManager
from airflow.sdk.definitions.asset import AssetUniqueKey
from airflow.utils.session import create_session
with create_session() as session:
    event = AssetManager.register_asset_change(asset=AssetUniqueKey(name=%r, uri=%r), extra=%r, session=session)
print("RESULT " + json.dumps(event is not None))
"""


@pytest.mark.slow
def test_scoring_task_submits_the_rendered_urls_with_the_latest_champion(airflow_env, tmp_path):
    """The real task (`airflow tasks test`) against a spark-submit that records its arguments and exits
    with the code it is given: the command line, and exit 3 failing at once instead of retrying."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "spark-submit").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/args.txt\nexit "$FAKE_EXIT"\n')
    (fake / "spark-submit").chmod(0o755)
    store, scores = tmp_path / "history_store", tmp_path / "scores"
    params = {"input": "s3a://lake/telco/dt={{ ds }}", "output": f"{scores}/dt={{{{ ds_nodash }}}}"}

    def score(exit_code: int, **more: str) -> str:
        spark_env = {"PATH": os.pathsep.join([str(fake), airflow_env["PATH"]]), "FAKE_EXIT": str(exit_code)}
        env = {**airflow_env, "AIRFLOW_VAR_DOWNPOUR_CRM_TELCO_HISTORY_STORE": str(store),
               "AIRFLOW_VAR_DOWNPOUR_SPARK_ENV": json.dumps(spark_env)}
        proc = subprocess.run(
            [str(AIRFLOW_BIN / "airflow"), "tasks", "test", "downpour_score_crm_telco", "score", "2024-06-03",
             "--task-params", json.dumps({**params, **more})],
            capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        return proc.stdout + proc.stderr

    log = score(3, model="/models/crm_telco/registry")  # a data contract violation: no retry can fix it
    assert "AirflowFailException: downpour score exited 3 (data contract violation), not retried" in log, log[-4000:]
    assert "new_state=failed" in log and "up_for_retry" not in log

    # a champion published on the Asset (the run above registered the DAG and its Asset); no model pinned
    extra = {"model_version": "v7", "model_dir": "/registry/v7/model"}
    assert _airflow_python(EMIT_CHAMPION % ("downpour_crm_telco_champion", "downpour://crm_telco/champion", extra),
                           airflow_env)
    log = score(0)
    assert "new_state=success" in log, log[-4000:]
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args[:2] == ["--master", "local[2]"]
    assert args[args.index(str(ROOT / "jobs" / "score.py")) + 1:] == [
        "--conf", str(ROOT / "conf" / "crm_telco.yaml"), "--input", "s3a://lake/telco/dt=2024-06-03",
        "--output", f"{scores}/dt=20240603", "--model", "/registry/v7/model", "--history-store", str(store)]


@pytest.mark.slow
def test_drift_task_triggers_retraining_only_when_the_batch_drifted(airflow_env, tmp_path):
    """The real task (`airflow tasks test`) on a scoring summary: drift -> success and the drift Asset's
    event (the retraining DAG's trigger); no drift -> skipped, nothing emitted; no summary -> failed."""
    scores = tmp_path / "scores"
    params = {"input": "unused", "history_store": "unused", "output": f"{scores}/dt={{{{ ds_nodash }}}}"}

    def drift_task(summary: dict | None) -> str:
        target = tmp_path / "scores" / "dt=20240603_summary.json"
        target.parent.mkdir(exist_ok=True)
        target.unlink(missing_ok=True)
        if summary is not None:
            target.write_text(json.dumps(summary))
        proc = subprocess.run(
            [str(AIRFLOW_BIN / "airflow"), "tasks", "test", "downpour_score_crm_telco", "drift", "2024-06-03",
             "--task-params", json.dumps(params)],
            capture_output=True, text=True, env=airflow_env, timeout=600, cwd=tmp_path)
        return proc.stdout + proc.stderr

    reasons = ["MonthlyCharges: PSI 1.234 > 0.2"]
    log = drift_task({"drift": {"drift": True, "reasons": reasons, "features": {}, "unseen": {}, "score": 0.3}})
    assert "new_state=success" in log and "emitting downpour://crm_telco/drift" in log, log[-4000:]
    assert "MonthlyCharges: PSI 1.234" in log
    log = drift_task({"drift": {"drift": False, "reasons": [], "features": {}, "unseen": {}, "score": 0.01}})
    assert "new_state=skipped" in log and "no drift in" in log and "emitting" not in log, log[-4000:]
    log = drift_task(None)  # score never wrote its summary: a data contract problem, not retried
    assert "drift check failed (exit 3)" in log and "new_state=failed" in log, log[-4000:]


SCORING_RULES = """
import json, sys
from datetime import datetime, timezone
from types import SimpleNamespace
sys.path.insert(0, %r)
import downpour_score as s

class Events(dict):  # Airflow's event accessors, keyed by the Asset
    def __getitem__(self, asset):
        return self.get(asset.uri, [])

def event(model_dir):
    return SimpleNamespace(extra={"model_dir": model_dir})

def failure(fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

fraud = "downpour://fraud/champion"
asset_run = {"dag_run": SimpleNamespace(run_after=datetime(2024, 6, 4, 3, 0, tzinfo=timezone.utc)), "params": {}}
daily = s.with_run_dates(asset_run, s.downpour_score_fraud.timetable)
out = {
    "daily": s.downpour_score_fraud.get_task("score").render_template("s3a://lake/tx/dt={{ ds }}", daily),
    "weekly": s.with_run_dates(asset_run, s.downpour_score_crm_telco.timetable)["ds"],
    "scheduled": s.with_run_dates({"logical_date": "kept", "ds": "2024-06-01"}, None)["ds"],
    "param": s.scoring_model("fraud", {"params": {"model": "/pinned"}}),
    "variable": s.scoring_model("crm_telco", {"params": {}}),
    "triggering": s.scoring_model("fraud", {"params": {}, "inlet_events": Events({fraud: [event("/v1")]}),
                                            "triggering_asset_events": Events({fraud: [event("/v2"), event("/v3")]})}),
    "latest": s.scoring_model("fraud", {"params": {}, "triggering_asset_events": Events(),
                                        "inlet_events": Events({fraud: [event("/v1"), event("/v2")]})}),
    "no_champion": failure(s.scoring_model, "fraud", {"params": {}, "inlet_events": Events()}),
    "no_store": failure(s.required_settings, "fraud", {"input": "in", "output": "out"}),
}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_scoring_run_without_a_logical_date_rescores_the_latest_period_with_the_champion(airflow_env):
    """An Asset-triggered run has no logical date in Airflow 3: its templates get the last complete period;
    the model is the param, else the Variable, else the champion that triggered the run, else the latest."""
    env = {**airflow_env, "AIRFLOW_VAR_DOWNPOUR_CRM_TELCO_MODEL": "/registry/crm_telco"}
    out = _airflow_python(SCORING_RULES % str(ROOT / "dags"), env)
    assert out["daily"] == "s3a://lake/tx/dt=2024-06-03"  # the run at 03:00 on the 4th: the day before
    assert out["weekly"] == "2024-05-26"  # a Tuesday: the last complete week, from Sunday
    assert out["scheduled"] == "2024-06-01"
    assert (out["param"], out["variable"], out["triggering"], out["latest"]) == (
        "/pinned", "/registry/crm_telco", "/v3", "/v2")
    assert out["no_champion"].startswith("AirflowFailException: scoring fraud: no champion has been published")
    assert "'downpour_fraud_model'" in out["no_champion"]
    assert out["no_store"] == ("AirflowFailException: scoring fraud: no history_store URL; set the Airflow "
                               "Variable 'downpour_fraud_history_store' (or pass the run param 'history_store')")
