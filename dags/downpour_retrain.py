"""Scheduled retraining with Downpour, one DAG per use case: prepare -> train -> evaluate -> publish.

DAGs: ``downpour_retrain_fraud`` (daily) and ``downpour_retrain_crm_telco`` (weekly).

* ``prepare``, ``train``, ``evaluate``: ``SparkSubmitOperator`` running the thin job scripts in
  ``jobs/`` (``spark-submit ... jobs/<stage>.py --conf <config> --set ...``) on the Spark connection
  of the run. They retry (``retries=2``) because what fails there is usually the cluster.
* ``evaluate`` runs the quality gate (``downpour evaluate --gate``). A refusal is a *decision*, not a
  failure of the evaluation: ``evaluate`` succeeds (its metrics and report are what you will want to
  read) and records the decision in the model card and the registry's ``history.jsonl``.
* ``publish`` acts on that decision. Promoted: it checks the registry's champion is this run's model,
  returns it (XCom) and emits the Asset ``downpour_<use case>_champion`` (URI
  ``downpour://<use case>/champion``) with the model version and directory, so scoring DAGs can be
  scheduled on it. Refused: it fails with ``AirflowFailException`` carrying the gate's reason (e.g.
  "model 20240601-... refused: test roc_auc 0.7012 < champion ... 0.8411 - tolerance 0.005"), is not
  retried, and the DAG run is failed, so ``on_failure_callback`` / alerting fire.

Settings (per run ``params`` beat Airflow Variables, which beat the defaults):

=================  =================================  ==================================================
param              Variable                           default
=================  =================================  ==================================================
``conf``           ``downpour_<use case>_conf``       ``<repo>/conf/<use case>.yaml``
``overrides``      ``downpour_<use case>_overrides``  ``[]``; ``--set`` items, Jinja-rendered (``{{ ds }}``);
                   (JSON list, applied first)         e.g. ``input.path=s3a://lake/tx/dt={{ ds }}``
``spark_conn_id``  ``downpour_spark_conn_id``         ``spark_default``
``spark_conf``     ``downpour_spark_conf`` (JSON)     ``{}``: extra ``--conf`` for spark-submit (GPUs, memory)
=================  =================================  ==================================================

``downpour_spark_env`` (JSON Variable) is the environment spark-submit runs with. By default it puts
the project's virtual environment first on ``PATH`` (so ``spark-submit`` is its PySpark's) and sets
``PYSPARK_PYTHON`` to its interpreter; on YARN / Kubernetes, where the image provides Python, set it
to ``{}`` or to what the cluster needs (the provider forwards it as ``spark.yarn.appMasterEnv.*`` /
``spark.kubernetes.driverEnv.*``).

The repository is found from this file (``dags/`` inside it) or ``$DOWNPOUR_HOME``; the project's
Python is ``$DOWNPOUR_PYTHON`` or ``<repo>/.venv/bin/python``. Config paths given to the jobs should be
absolute (or URLs): spark-submit runs in the Airflow worker's working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.exceptions import AirflowException, AirflowFailException
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Asset, Param, Variable, get_current_context, task

ROOT = Path(os.environ.get("DOWNPOUR_HOME") or Path(__file__).resolve().parents[1])
PYTHON = os.environ.get("DOWNPOUR_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
JOBS = ROOT / "jobs"
GATE_REFUSED = 4  # exit code of a quality-gate refusal everywhere in Downpour

USE_CASES: dict[str, dict[str, Any]] = {
    "fraud": {"schedule": "@daily", "doc": "card-fraud model on the daily transactions"},
    "crm_telco": {"schedule": "@weekly", "doc": "churn model on the CRM customer table"},
}
DEFAULT_ARGS = {"owner": "downpour", "retries": 2, "retry_delay": timedelta(minutes=5),
                "retry_exponential_backoff": True}
TIMEOUTS = {"prepare": timedelta(hours=2), "train": timedelta(hours=8), "evaluate": timedelta(hours=2)}


# ---- settings resolved at run time ---------------------------------------------------------------------
def _json_variable(key: str, default: Any) -> Any:
    value = Variable.get(key, default=None)
    if value is None:
        return default
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        raise AirflowFailException(f"Airflow Variable {key!r} must be JSON: {exc}") from None


def default_spark_env() -> dict[str, str]:
    """spark-submit from the project's venv, its Python for the driver and the executors (local installs)."""
    venv_bin = str(Path(PYTHON).parent)
    if not Path(venv_bin, "spark-submit").exists():
        return {}
    return {"PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")]), "PYSPARK_PYTHON": PYTHON}


def resolve_settings(use_case: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """conf, overrides, connection, spark conf and env for one run: params > Variables > defaults."""
    conf = (params.get("conf") or Variable.get(f"downpour_{use_case}_conf", default=None)
            or str(ROOT / "conf" / f"{use_case}.yaml"))
    overrides = [*_json_variable(f"downpour_{use_case}_overrides", []), *(params.get("overrides") or [])]
    if not all(isinstance(o, str) and "=" in o for o in overrides):
        raise AirflowFailException(f"overrides must be KEY=VALUE strings, got {overrides!r}")
    env = _json_variable("downpour_spark_env", None)
    return {
        "conf": str(conf),
        "overrides": overrides,
        "spark_conn_id": params.get("spark_conn_id") or Variable.get("downpour_spark_conn_id",
                                                                     default="spark_default"),
        "spark_conf": {**_json_variable("downpour_spark_conf", {}), **(params.get("spark_conf") or {})},
        "env": default_spark_env() if env is None else env,
    }


def job_args(settings: Mapping[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """The arguments every job script takes: --conf FILE --set K=V ... plus the stage's own."""
    sets = [x for item in settings["overrides"] for x in ("--set", item)]
    return ["--conf", settings["conf"], *sets, *extra]


class DownpourSparkSubmitOperator(SparkSubmitOperator):
    """spark-submit of one Downpour job script; conf, overrides and connection come from the run.

    The stock operator fixes its connection when the DAG is parsed; here it is chosen per run (param
    or Variable), and the ``--set`` overrides are rendered with the run's Jinja context.
    """

    def __init__(self, *, use_case: str, stage: str, stage_args: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(application=str(JOBS / f"{stage}.py"), name=f"downpour-{use_case}-{stage}", **kwargs)
        self.use_case = use_case
        self.stage = stage
        self.stage_args = list(stage_args)

    def execute(self, context: Any) -> None:
        settings = resolve_settings(self.use_case, context["params"])
        settings["overrides"] = self.render_template(settings["overrides"], context)
        self._conn_id = settings["spark_conn_id"]  # the provider's attribute behind its conn_id argument
        self.conf = {**(self.conf or {}), **settings["spark_conf"]}
        self.env_vars = {**settings["env"], **(self.env_vars or {})}
        self.application_args = [*job_args(settings, self.stage_args), *(self.application_args or [])]
        self._hook = None  # built from the settings above
        self.log.info("downpour %s on connection %r: %s", self.stage, self._conn_id, self.application_args)
        return super().execute(context)


def run_publish(use_case: str, params: Mapping[str, Any], render: Any = None) -> dict[str, Any]:
    """Run jobs/publish.py with the project's Python; refusal -> AirflowFailException with the reason."""
    settings = resolve_settings(use_case, params)
    if render is not None:
        settings["overrides"] = render(settings["overrides"])
    cmd = [PYTHON, str(JOBS / "publish.py"), *job_args(settings), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.stderr.strip():
        print(proc.stderr.rstrip())  # the job's log lines, into the task log
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if proc.returncode == GATE_REFUSED:
        raise AirflowFailException(f"quality gate refused the model, nothing published: {result.get('reason')}")
    if proc.returncode != 0:
        reason = result.get("reason") or proc.stderr.strip().splitlines()[-1:] or "no output"
        if proc.returncode in (2, 3):  # config / data contract: a retry cannot fix it
            raise AirflowFailException(f"publish failed (exit {proc.returncode}): {reason}")
        raise AirflowException(f"publish failed (exit {proc.returncode}): {reason}")
    return result


def build_dag(use_case: str, schedule: str, doc: str) -> DAG:
    champion = Asset(name=f"downpour_{use_case}_champion", uri=f"downpour://{use_case}/champion")
    with DAG(
        dag_id=f"downpour_retrain_{use_case}",
        description=f"Downpour retraining: {doc}",
        schedule=schedule,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        max_active_runs=1,  # runs share output.path and the registry
        default_args=DEFAULT_ARGS,
        tags=["downpour", "ml", use_case],
        doc_md=__doc__,
        params={
            "conf": Param(None, type=["null", "string"],
                          description=f"config file (default: Variable downpour_{use_case}_conf, "
                                      f"else conf/{use_case}.yaml in the repo)"),
            "overrides": Param([], type="array", items={"type": "string"},
                               description="--set KEY=VALUE items (Jinja-rendered)"),
            "spark_conn_id": Param(None, type=["null", "string"],
                                   description="Spark connection (default: Variable downpour_spark_conn_id, "
                                               "else spark_default)"),
            "spark_conf": Param({}, type="object", description="extra spark-submit --conf settings"),
        },
    ) as dag:
        stages = {
            stage: DownpourSparkSubmitOperator(
                task_id=stage, use_case=use_case, stage=stage, execution_timeout=TIMEOUTS[stage],
                stage_args=["--gate", "--refusal-ok"] if stage == "evaluate" else [],
            )
            for stage in ("prepare", "train", "evaluate")
        }

        @task(task_id="publish", outlets=[champion], execution_timeout=timedelta(minutes=30))
        def publish() -> dict[str, Any]:
            """Fail (no retry) when the gate refused; else announce the new champion on the Asset."""
            context = get_current_context()
            result = run_publish(use_case, context["params"],
                                 render=lambda v: context["task"].render_template(v, context))
            context["outlet_events"][champion].extra = {
                k: result.get(k) for k in ("model_version", "model_dir", "metric", "value", "data_version")
            }
            print(f"published model {result['model_version']} of {use_case}: {result['model_dir']}")
            return result

        stages["prepare"] >> stages["train"] >> stages["evaluate"] >> publish()
    return dag


for _use_case, _spec in USE_CASES.items():
    globals()[f"downpour_retrain_{_use_case}"] = build_dag(_use_case, _spec["schedule"], _spec["doc"])
