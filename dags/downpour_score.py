"""Batch scoring with the current champion, one DAG per use case: ``downpour_score_<use case>``.

DAGs: ``downpour_score_fraud`` (daily) and ``downpour_score_crm_telco`` (weekly), two tasks:

* ``score``: ``spark-submit ... jobs/score.py --conf <config> --set ... --input <URL> --output <URL>
  --model <DIR> --history-store <URL>`` on the Spark connection of the run
  (``DownpourSparkSubmitOperator``, as the retraining stages);
* ``drift``: reads the run's ``<output>_summary.json`` (``jobs/drift.py``, the project's Python). When
  the batch drifted from the model's training data (``scoring.drift`` thresholds) it emits the Asset
  ``downpour_<use case>_drift`` (URI ``downpour://<use case>/drift``, the reasons in its extra), on which
  ``downpour_retrain_<use case>`` is scheduled besides its period; otherwise it is skipped, and no
  retraining is triggered.

Schedule: ``AssetOrTimeSchedule``, both of

* **every period** (``USE_CASES[...]["score_schedule"]``, a cron data interval in Airflow's default
  timezone): the run of the period that just ended scores that period's data (``{{ ds }}`` is its
  first day: the 00:00 run of 2024-06-04 scores ``dt=2024-06-03``), so every new day is scored by
  whatever is the champion then;
* **every new champion**: the Asset ``downpour://<use case>/champion`` that ``downpour_retrain_<use
  case>`` emits when its gate promoted a model. Such a run re-scores the latest complete period with
  the new champion (writing that period's output again), so consumers never keep scores of a model
  that is no longer the champion. Airflow 3 gives Asset-triggered runs no logical date; this DAG
  renders their templates with the data interval of the last complete period before the run
  (``ds``, ``ds_nodash``, ``ts``, ``ts_nodash``, ``logical_date``, ``data_interval_start/end``).

``max_active_runs=1``: runs share the history store, which each run reads and rolls forward (a
re-score overlaps the store's end; scoring counts each event once). ``catchup=False``: a missed period
is not scored by itself, and the next run then finds a gap between the store's end and its input:
set ``scoring.max_history_gap`` in the config (e.g. ``6h`` for daily data) so that it stops with exit 3
rather than scoring window features over missing events, and backfill the missed periods in order
(``airflow backfill create --dag-id downpour_score_<use case> --from-date ... --to-date ...``).

Exit codes of the job: 2 (config) and 3 (data contract, e.g. that gap) fail the task at once with
``AirflowFailException``: a retry would read the same config and data. Anything else retries
(``retries=2``), as in the retraining DAGs. (spark-submit reports the job's exit code in client
mode; in cluster deploy mode every failure retries.)

Settings (params > Airflow Variables > defaults; ``conf``, ``overrides``, ``spark_conn_id``,
``spark_conf`` and ``downpour_spark_env`` exactly as in ``downpour_retrain.py``):

=================  ==========================================  =========================================
param              Variable                                    default
=================  ==========================================  =========================================
``input``          ``downpour_<use case>_score_input``         required; raw table URL, Jinja-rendered,
                                                               e.g. ``s3a://lake/tx/dt={{ ds }}``
``output``         ``downpour_<use case>_score_output``        required; scores URL, Jinja-rendered,
                                                               e.g. ``s3a://lake/scores/dt={{ ds }}``
``history_store``  ``downpour_<use case>_history_store``       required; the entity history read and
                                                               rolled forward (the same URL every run)
``model``          ``downpour_<use case>_model``               the ``model_dir`` of the champion event
                   (a registry directory: its champion)        that triggered the run, else of the latest
                                                               champion event; none: the task fails
=================  ==========================================  =========================================

A required setting that is missing fails the task with ``AirflowFailException`` naming its Variable.
Without a pinned model and before any champion was published the task fails too, rather than score
with ``<output.path>/model``, the last *trained* model, which the gate may have refused. To follow
the registry (a rollback of ``champion.json`` included), set ``downpour_<use case>_model`` to the
registry directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from airflow.sdk import DAG, Param, Variable, get_current_context, task, timezone
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.interval import CronDataIntervalTimetable
from downpour_common import (
    DEFAULT_ARGS,
    FINAL_EXIT_CODES,
    TIMEOUTS,
    USE_CASES,
    DownpourSparkSubmitOperator,
    champion_asset,
    drift_asset,
    run_params,
    run_project_job,
    with_run_dates,
)

START = timezone.datetime(2024, 1, 1)  # Airflow's default timezone, as the retraining DAGs' schedules
REQUIRED = {"input": "score_input", "output": "score_output", "history_store": "history_store"}


def required_settings(use_case: str, params: Mapping[str, Any]) -> dict[str, str]:
    """input, output and history store of a run (param > Variable); missing: fail, naming the Variable."""
    settings = {}
    for name, suffix in REQUIRED.items():
        variable = f"downpour_{use_case}_{suffix}"
        value = params.get(name) or Variable.get(variable, default=None)
        if not value:
            raise AirflowFailException(f"scoring {use_case}: no {name} URL; set the Airflow Variable "
                                       f"{variable!r} (or pass the run param {name!r})")
        settings[name] = str(value)
    return settings


def _latest_model_dir(events: Iterable[Any]) -> str | None:
    dirs = [e.extra["model_dir"] for e in events if (e.extra or {}).get("model_dir")]
    return dirs[-1] if dirs else None  # events come oldest first


def scoring_model(use_case: str, context: Mapping[str, Any]) -> str:
    """param > Variable > the champion that triggered this run > the latest champion published."""
    variable = f"downpour_{use_case}_model"
    pinned = context["params"].get("model") or Variable.get(variable, default=None)
    if pinned:
        return str(pinned)
    champion = champion_asset(use_case)
    triggering = context.get("triggering_asset_events")  # empty unless an Asset event triggered the run
    model = (_latest_model_dir(triggering[champion] if triggering else [])
             or _latest_model_dir(context["inlet_events"][champion]))
    if not model:
        raise AirflowFailException(
            f"scoring {use_case}: no champion has been published on {champion.uri} yet; run "
            f"downpour_retrain_{use_case}, or pin a model (a model or registry directory) with the Airflow "
            f"Variable {variable!r} or the run param 'model'")
    return model


def score_args(use_case: str, context: Mapping[str, Any], render: Callable[[Any], Any]) -> list[str]:
    """``--input --output --model --history-store`` of jobs/score.py, the URLs rendered with ``render``."""
    urls = render(required_settings(use_case, context["params"]))
    return ["--input", urls["input"], "--output", urls["output"], "--model", scoring_model(use_case, context),
            "--history-store", urls["history_store"]]


class DownpourScoreOperator(DownpourSparkSubmitOperator):
    """jobs/score.py, its URLs and model resolved when the task runs; exit 2/3 are not retried."""

    def __init__(self, *, use_case: str, **kwargs: Any) -> None:
        super().__init__(use_case=use_case, stage="score", final_exit_codes=FINAL_EXIT_CODES,
                         inlets=[champion_asset(use_case)], **kwargs)

    def execute(self, context: Any) -> None:
        context = with_run_dates(context, self.dag.timetable)
        self.stage_args = score_args(self.use_case, context, lambda v: self.render_template(v, context))
        return super().execute(context)


def check_drift(use_case: str, context: Mapping[str, Any], render: Callable[[Any], Any]) -> dict[str, Any]:
    """The drift section of this run's scoring summary (jobs/drift.py); no drift -> AirflowSkipException,
    so the task emits no Asset event and retraining is not triggered."""
    context = with_run_dates(context, context["dag"].timetable)
    output = render(required_settings(use_case, context["params"]))["output"]
    code, drift, stderr = run_project_job("drift", ["--output", output], timeout=600)
    if code != 0:
        reason = (stderr.strip().splitlines() or ["no output"])[-1]
        if code in FINAL_EXIT_CODES:
            raise AirflowFailException(f"drift check failed (exit {code}): {reason}")
        raise AirflowException(f"drift check failed (exit {code}): {reason}")
    if drift.get("drift") is None:
        raise AirflowSkipException(f"no drift figures for {output} ({'; '.join(drift.get('reasons', []))}): "
                                   "retraining is not triggered")
    if not drift["drift"]:
        raise AirflowSkipException(f"no drift in {output}: retraining is not triggered")
    return {"output": output, "reasons": drift.get("reasons", [])}


def build_dag(use_case: str, schedule: str, doc: str) -> DAG:
    with DAG(
        dag_id=f"downpour_score_{use_case}",
        description=f"Downpour scoring with the champion: {doc}",
        schedule=AssetOrTimeSchedule(timetable=CronDataIntervalTimetable(schedule, timezone=START.tzinfo),
                                     assets=[champion_asset(use_case)]),
        start_date=START,
        catchup=False,
        max_active_runs=1,  # runs share the history store
        default_args=DEFAULT_ARGS,
        tags=["downpour", "ml", "scoring", use_case],
        doc_md=__doc__,
        params={
            **run_params(use_case),
            "input": Param(None, type=["null", "string"], description="raw table URL, Jinja-rendered "
                           f"(default: Variable downpour_{use_case}_score_input)"),
            "output": Param(None, type=["null", "string"], description="scores URL, Jinja-rendered "
                            f"(default: Variable downpour_{use_case}_score_output)"),
            "history_store": Param(None, type=["null", "string"], description="entity history store URL "
                                   f"(default: Variable downpour_{use_case}_history_store)"),
            "model": Param(None, type=["null", "string"], description="model or registry directory (default: "
                           f"Variable downpour_{use_case}_model, else the champion of the Asset events)"),
        },
    ) as dag:
        score = DownpourScoreOperator(task_id="score", use_case=use_case, execution_timeout=TIMEOUTS["score"])
        drifted = drift_asset(use_case)

        @task(task_id="drift", outlets=[drifted], retries=1, execution_timeout=timedelta(minutes=15))
        def drift() -> dict[str, Any]:
            """Emit the drift Asset (the retraining DAG's trigger) when the batch drifted; skip otherwise."""
            context = get_current_context()
            found = check_drift(use_case, context, lambda v: context["task"].render_template(v, context))
            context["outlet_events"][drifted].extra = found
            print(f"{use_case}: the scored batch drifted ({'; '.join(found['reasons'])}): emitting {drifted.uri}")
            return found

        score >> drift()
    return dag


for _use_case, _spec in USE_CASES.items():
    globals()[f"downpour_score_{_use_case}"] = build_dag(_use_case, _spec["score_schedule"], _spec["doc"])
