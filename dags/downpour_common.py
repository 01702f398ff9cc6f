"""What the Downpour DAGs share: where the repository is, the run's settings, the spark-submit operator.

Not a DAG file (``.airflowignore`` keeps the DAG processor from parsing it): ``downpour_retrain.py`` and
``downpour_score.py`` import it, which works because Airflow puts the root of the DAG bundle (the
``dags/`` folder with the default ``LocalDagBundle``) on ``sys.path``. One module rather than one DAG
file importing the other: importing a DAG file builds its DAGs a second time, in the importer's parse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.exceptions import AirflowException, AirflowFailException
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset, Param, Variable, timezone
from airflow.timetables.base import Timetable

ROOT = Path(os.environ.get("DOWNPOUR_HOME") or Path(__file__).resolve().parents[1])
PYTHON = os.environ.get("DOWNPOUR_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
JOBS = ROOT / "jobs"
# exit codes of every Downpour job that a retry cannot change (the CLI's: 2 config, 3 data contract)
FINAL_EXIT_CODES = {2: "configuration error", 3: "data contract violation"}

USE_CASES: dict[str, dict[str, Any]] = {
    "fraud": {"schedule": "@daily", "score_schedule": "@daily",
              "doc": "card-fraud model on the daily transactions"},
    "crm_telco": {"schedule": "@weekly", "score_schedule": "@weekly",
                  "doc": "churn model on the CRM customer table"},
}
DEFAULT_ARGS = {"owner": "downpour", "retries": 2, "retry_delay": timedelta(minutes=5),
                "retry_exponential_backoff": True}
TIMEOUTS = {"prepare": timedelta(hours=2), "train": timedelta(hours=8), "evaluate": timedelta(hours=2),
            "score": timedelta(hours=4)}


def champion_asset(use_case: str) -> Asset:
    """The Asset the retraining DAG's ``publish`` emits and the scoring DAG is scheduled on (one definition)."""
    return Asset(name=f"downpour_{use_case}_champion", uri=f"downpour://{use_case}/champion")


def drift_asset(use_case: str) -> Asset:
    """The Asset the scoring DAG's ``drift`` task emits when a batch drifted; the retraining DAG runs on it."""
    return Asset(name=f"downpour_{use_case}_drift", uri=f"downpour://{use_case}/drift")


def run_project_job(job: str, args: Sequence[str], timeout: float = 1800) -> tuple[int, dict[str, Any], str]:
    """(exit code, its last JSON line on stdout, stderr) of ``jobs/<job>.py`` run with the project's Python
    (the Airflow environment does not have Downpour installed)."""
    import subprocess

    proc = subprocess.run([PYTHON, str(JOBS / f"{job}.py"), *args, "--json"], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.stderr.strip():
        print(proc.stderr.rstrip())  # the job's log lines, into the task log
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), proc.stderr


def with_run_dates(context: Mapping[str, Any], timetable: Timetable) -> Mapping[str, Any]:
    """The run's template context; a run without a logical date (Asset-triggered) gets the dates of the
    last complete period before it, so that ``dt={{ ds }}`` re-scores the latest day, not nothing."""
    if context.get("logical_date") is not None:
        return context
    interval = timetable.infer_manual_data_interval(run_after=timezone.coerce_datetime(context["dag_run"].run_after))
    start = interval.start
    return {**context, "logical_date": start, "ds": start.strftime("%Y-%m-%d"), "ds_nodash": start.strftime("%Y%m%d"),
            "ts": start.isoformat(), "ts_nodash": start.strftime("%Y%m%dT%H%M%S"),
            "data_interval_start": start, "data_interval_end": interval.end}


def run_params(use_case: str) -> dict[str, Param]:
    """The params every Downpour DAG takes (conf, overrides, Spark connection and conf)."""
    return {
        "conf": Param(None, type=["null", "string"],
                      description=f"config file (default: Variable downpour_{use_case}_conf, "
                                  f"else conf/{use_case}.yaml in the repo)"),
        "overrides": Param([], type="array", items={"type": "string"},
                           description="--set KEY=VALUE items (Jinja-rendered)"),
        "spark_conn_id": Param(None, type=["null", "string"],
                               description="Spark connection (default: Variable downpour_spark_conn_id, "
                                           "else spark_default)"),
        "spark_conf": Param({}, type="object", description="extra spark-submit --conf settings"),
    }


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
    or Variable), and the ``--set`` overrides are rendered with the run's Jinja context. A job exit code
    in ``final_exit_codes`` (config, data contract) fails the task without retries: the next try would
    read the same config and data. spark-submit reports the job's exit code in client mode (and the
    driver's on Kubernetes); in YARN / standalone cluster mode it does not, and such failures retry.
    """

    def __init__(self, *, use_case: str, stage: str, stage_args: Sequence[str] = (),
                 final_exit_codes: Collection[int] = (), **kwargs: Any) -> None:
        super().__init__(application=str(JOBS / f"{stage}.py"), name=f"downpour-{use_case}-{stage}", **kwargs)
        self.use_case = use_case
        self.stage = stage
        self.stage_args = list(stage_args)
        self.final_exit_codes = frozenset(final_exit_codes)

    def execute(self, context: Any) -> None:
        context = with_run_dates(context, self.dag.timetable)  # an Asset-triggered run has no logical date
        settings = resolve_settings(self.use_case, context["params"])
        settings["overrides"] = self.render_template(settings["overrides"], context)
        self._conn_id = settings["spark_conn_id"]  # the provider's attribute behind its conn_id argument
        self.conf = {**(self.conf or {}), **settings["spark_conf"]}
        self.env_vars = {**settings["env"], **(self.env_vars or {})}
        self.application_args = [*job_args(settings, self.stage_args), *(self.application_args or [])]
        self._hook = None  # built from the settings above
        self.log.info("downpour %s on connection %r: %s", self.stage, self._conn_id, self.application_args)
        try:
            return super().execute(context)
        except AirflowFailException:
            raise
        except AirflowException as exc:
            code = self._job_exit_code()
            if code in self.final_exit_codes:
                raise AirflowFailException(f"downpour {self.stage} exited {code} ({FINAL_EXIT_CODES.get(code)}), "
                                           f"not retried: {exc}") from exc
            raise

    def _job_exit_code(self) -> int | None:
        """The job's exit code as spark-submit reported it (None where it cannot: cluster deploy mode)."""
        hook = self._hook
        if hook is None:
            return None
        if getattr(hook, "_is_kubernetes", False):
            return getattr(hook, "_spark_exit_code", None)
        if getattr(hook, "_connection", {}).get("deploy_mode") == "cluster":
            return None
        return getattr(getattr(hook, "_submit_sp", None), "returncode", None)
