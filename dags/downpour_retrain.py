"""Scheduled retraining with Downpour, one DAG per use case: prepare -> train -> evaluate -> publish.

DAGs: ``downpour_retrain_fraud`` (daily) and ``downpour_retrain_crm_telco`` (weekly), and also whenever a
scoring run found that its batch drifted from the training data: the Asset ``downpour_<use case>_drift``
(URI ``downpour://<use case>/drift``) that ``downpour_score_<use case>``'s ``drift`` task emits.

* ``prepare``, ``train``, ``evaluate``: ``SparkSubmitOperator`` running the thin job scripts in
  ``jobs/`` (``spark-submit ... jobs/<stage>.py --conf <config> --set ...``) on the Spark connection
  of the run. They retry (``retries=2``) because what fails there is usually the cluster.
* ``evaluate`` runs the quality gate (``downpour evaluate --gate``). A refusal is a *decision*, not a
  failure of the evaluation: ``evaluate`` succeeds (its metrics and report are what you will want to
  read) and records the decision in the model card and the registry's ``history.jsonl``.
* ``publish`` acts on that decision. Promoted: it checks the registry's champion is this run's model,
  returns it (XCom) and emits the Asset ``downpour_<use case>_champion`` (URI
  ``downpour://<use case>/champion``) with the model version and directory, on which the scoring DAGs
  (``downpour_score.py``) are scheduled. Refused: it fails with ``AirflowFailException`` carrying the
  gate's reason (e.g. "model 20240601-... refused: test roc_auc 0.7012 < champion ... 0.8411 - tolerance
  0.005"), is not retried, and the DAG run is failed, so ``on_failure_callback`` / alerting fire.

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

The code the Downpour DAGs share is in ``downpour_common.py``. The repository is found from the
``dags/`` folder inside it or ``$DOWNPOUR_HOME``; the project's
Python is ``$DOWNPOUR_PYTHON`` or ``<repo>/.venv/bin/python``. Config paths given to the jobs should be
absolute (or URLs): spark-submit runs in the Airflow worker's working directory.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from airflow.exceptions import AirflowException, AirflowFailException
from airflow.sdk import DAG, get_current_context, task, timezone
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable
from downpour_common import (
    DEFAULT_ARGS,
    FINAL_EXIT_CODES,
    JOBS,
    PYTHON,
    TIMEOUTS,
    USE_CASES,
    DownpourSparkSubmitOperator,
    champion_asset,
    drift_asset,
    job_args,
    resolve_settings,
    run_params,
    with_run_dates,
)

START = timezone.datetime(2024, 1, 1)  # Airflow's default timezone, as the scoring DAGs'
GATE_REFUSED = 4  # exit code of a quality-gate refusal everywhere in Downpour


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
        if proc.returncode in FINAL_EXIT_CODES:  # config / data contract: a retry cannot fix it
            raise AirflowFailException(f"publish failed (exit {proc.returncode}): {reason}")
        raise AirflowException(f"publish failed (exit {proc.returncode}): {reason}")
    return result


def build_dag(use_case: str, schedule: str, doc: str) -> DAG:
    champion = champion_asset(use_case)
    with DAG(
        dag_id=f"downpour_retrain_{use_case}",
        description=f"Downpour retraining: {doc}",
        # the period, or a scoring run that found drift (dags/downpour_score.py's drift task)
        schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(schedule, timezone=START.tzinfo),
                                     assets=[drift_asset(use_case)]),
        start_date=START,
        catchup=False,
        max_active_runs=1,  # runs share output.path and the registry
        default_args=DEFAULT_ARGS,
        tags=["downpour", "ml", use_case],
        doc_md=__doc__,
        params=run_params(use_case),
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
            context = with_run_dates(get_current_context(), dag.timetable)
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
