"""``downpour train``: data-parallel Keras training with Horovod on Spark, resumable, then export.

The driver (this process) resolves ``prepared/`` once, plans the run from the manifest (steps per
epoch, imbalance handling, checkpoint key) and launches ``training.workers`` Horovod processes with
``horovod.spark.run`` over gloo, one per Spark task. Each rank pins its CPU threads (and the GPUs
Spark gave its task), reads its own row groups through ``training.input``, and trains with
``hvd.DistributedOptimizer``; rank 0 writes per-epoch checkpoints, TensorBoard logs and, at the end,
the SavedModel. The driver then writes ``history.json`` and ``model_card.json`` beside it and
publishes the model directory in one step. A re-run resumes from the last complete checkpoint.

The plan is ``training/plan.py``'s ``RankPlan``; what one rank does is ``training/rank.py``. Nothing
here imports TensorFlow: the driver never needs it.
"""

from __future__ import annotations

import _thread
import datetime as dt
import hashlib
import os
import re
import shutil
import signal
import statistics
import sys
import threading
from typing import Any

from downpour import storage
from downpour.artifact import ENTITY_HISTORY, TENSORBOARD, ModelArtifact
from downpour.config import Config
from downpour.errors import ConfigError, DataContractError, DownpourError
from downpour.layout import PreparedLayout, RunLayout
from downpour.logs import LOG, timed
from downpour.training.checkpoints import CheckpointStore
from downpour.training.input import PreparedData, open_prepared
from downpour.training.plan import RankPlan, make_plan
from downpour.training.rank import RANK_ERROR, rank_main

_COMM_ERRORS = ("HorovodInternalError", "ConnectionResetError", "BrokenPipeError")
# Horovod's own tuning and diagnostics: set in the driver's environment, they reach every rank (what
# Horovod sets per rank, such as HOROVOD_RANK, stays Horovod's)
HOROVOD_SETTINGS = ("HOROVOD_TIMELINE", "HOROVOD_TIMELINE_MARK_CYCLES", "HOROVOD_CYCLE_TIME",
                    "HOROVOD_FUSION_THRESHOLD", "HOROVOD_CACHE_CAPACITY", "HOROVOD_LOG_LEVEL",
                    "HOROVOD_AUTOTUNE", "HOROVOD_AUTOTUNE_LOG")
# what a rank takes from the driver's environment when set there: a rank gets the executor's environment,
# which may lack it. TF_USE_LEGACY_KERAS: on TF 2.16+ (Databricks 15.4 LTS ML) tf.keras is Keras 2
# (tf_keras) only with it set
PASSED_TO_RANKS = (*HOROVOD_SETTINGS, "TF_USE_LEGACY_KERAS")


class TrainingFailed(DownpourError):
    """Training could not finish (a worker failed, was lost, or the run timed out)."""

    exit_code = 1


# ==== driver ========================================================================================
def run_training(spark: Any, cfg: Config, fresh: bool = False) -> dict[str, Any]:
    """Train on ``<output.path>/prepared`` and publish ``<output.path>/model``; returns the model card."""
    t = cfg.training
    with timed(f"train {cfg.name}: {t.workers} worker(s)") as took:
        prepared = open_prepared(cfg.output.path)
        _check_slots(spark, t.workers)
        plan = make_plan(cfg, prepared, fresh)
        rounds = plan.budget.rounds
        try:
            store = CheckpointStore(plan.checkpoints, plan.run_key)
            workers = t.workers
            if fresh:
                store.clear()
                storage.delete_dir(plan.tensorboard)
                LOG.info("train --fresh: checkpoints and TensorBoard logs cleared")
            else:
                done = store.latest()
                if done and (done.get("stopped_early") or int(done["epoch"]) >= rounds):
                    LOG.info("train: the checkpoint in %s is complete (epoch %d%s); exporting it without "
                             "training (use --fresh to retrain)", store.url, done["epoch"],
                             ", stopped early" if done.get("stopped_early") else "")
                    workers = 1
            results = launch(spark, plan, workers=workers, timeout_s=t.timeout_s)
            card = finish(cfg, prepared, plan, results)
        except BaseException:
            storage.delete_dir(plan.staging)
            raise
    card["training"]["duration_s"] = round(took.get("seconds", 0.0), 1)
    return card


def _check_slots(spark: Any, workers: int) -> None:
    """Fail fast when a local master has fewer task slots than workers (Horovod would wait and time out)."""
    master = spark.sparkContext.master
    m = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\d+)?\])?", master)
    if not m:
        return  # a cluster: executors may still be coming (dynamic allocation); start_timeout bounds it
    if m.group(1) == "*":
        slots = os.cpu_count() or 1
    else:
        slots = int(m.group(1) or 1)
    if workers > slots:
        raise ConfigError(f"training.workers: {workers} workers need {workers} Spark task slots, "
                          f"but the master {master} has {slots}")


def launch(spark: Any, plan: RankPlan, workers: int, timeout_s: int) -> list[dict[str, Any]]:
    """Run ``workers`` ranks with ``horovod.spark.run`` (gloo), bounded by ``timeout_s``.

    Horovod's ``start_timeout`` bounds the wait for Spark tasks; gloo's own timeout bounds a
    collective waiting on a lost peer; and this function's guard bounds the whole run: past
    ``timeout_s`` the Spark job group is cancelled and a one-line error raised. A worker's own
    error comes back as one line (the rank prints a marked line; the driver picks it out).
    """
    import horovod.spark
    from horovod.spark.driver import job_id

    env = {
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(min(timeout_s, 3600)),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "PYTHONUNBUFFERED": "1",
        "DOWNPOUR_LOG_LEVEL": os.environ.get("DOWNPOUR_LOG_LEVEL", "INFO"),
        **{k: os.environ[k] for k in PASSED_TO_RANKS if k in os.environ},
    }
    out, err = _Tee(sys.stdout), _Tee(sys.stderr)
    group = f"horovod.spark.run.{job_id.JOB_ID + 1}"  # the job group horovod.spark.run is about to use
    done, fired = threading.Event(), threading.Event()

    def watchdog() -> None:
        # horovod.spark.run installs signal handlers, so it must run in the main thread; the guard
        # watches from here: cancel the Spark job (its tasks own the worker processes), and if the
        # driver still does not return, interrupt the main thread.
        if done.wait(timeout_s):
            return
        fired.set()
        LOG.error("training exceeded training.timeout_s=%ds: cancelling Spark job group %s", timeout_s, group)
        spark.sparkContext.cancelJobGroup(group)
        if not done.wait(120):
            _thread.interrupt_main()

    timeout_msg = (f"training did not finish within training.timeout_s={timeout_s}s (a worker was lost or "
                   "is stuck); re-running `downpour train` resumes from the last complete checkpoint")
    previous_hook = threading.excepthook
    threading.excepthook = _quiet_thread_errors(previous_hook)
    threading.Thread(target=watchdog, name="downpour-train-watchdog", daemon=True).start()
    try:
        with timed(f"horovod.spark.run: {workers} rank(s) over gloo"):
            return horovod.spark.run(
                rank_main, args=(plan,), num_proc=workers, start_timeout=timeout_s, use_gloo=True,
                env=env, stdout=out, stderr=err, verbose=2 if LOG.isEnabledFor(10) else 0,
            )
    except KeyboardInterrupt:
        if fired.is_set():
            raise TrainingFailed(timeout_msg) from None
        raise
    except Exception as exc:  # noqa: BLE001 - turned into one line naming the failing worker
        if fired.is_set():
            raise TrainingFailed(timeout_msg) from None
        raise _worker_error(exc, err.errors + out.errors, workers) from None
    finally:
        done.set()
        threading.excepthook = previous_hook


def _quiet_thread_errors(previous: Any) -> Any:
    """Horovod's Spark thread re-raises a cancelled job's Java stack trace; the caller reports the
    failure in one line, so such traces go to the debug log instead of the console."""

    def hook(args: Any) -> None:
        if args.thread is not None and args.thread.name.startswith("Thread") and args.exc_type is not SystemExit:
            LOG.debug("horovod thread %s: %s: %s", args.thread.name, args.exc_type.__name__,
                      str(args.exc_value).splitlines()[0] if str(args.exc_value) else "")
            return
        previous(args)

    return hook


def _worker_error(exc: BaseException, marked: list[tuple[int, str, str]], workers: int) -> DownpourError:
    """The most telling one-line error: a rank's own failure first; else a rank that died without
    reporting (killed, out of memory, its task gone) is named as lost; the peers' lost-connection
    errors only when nothing better is known."""
    own = sorted((e for e in marked if e[1] not in _COMM_ERRORS), key=lambda e: e[0])
    if own:
        rank, kind, msg = own[0]
        if kind in ("ConfigError", "DataContractError"):
            return (ConfigError if kind == "ConfigError" else DataContractError)(msg)
        return TrainingFailed(f"training failed on worker {rank}: {kind}: {msg}")
    reported = {e[0] for e in marked}
    first = _HVD_FIRST_FAILED.search(str(exc))  # horovod names the first rank to exit non-zero
    lost: list[int] = []
    if first and int(first.group(1)) not in reported:
        lost, how = [int(first.group(1))], _exit_reason(int(first.group(2)))
    elif marked:
        lost, how = sorted(set(range(workers)) - reported), "it stopped without reporting an error"
    if lost:
        who = f"worker {lost[0]} was" if len(lost) == 1 else f"workers {', '.join(map(str, lost))} were"
        peers = "; the other workers stopped when it disappeared" if workers > len(lost) else ""
        return TrainingFailed(f"training failed: {who} lost ({how}){peers}. Re-running `downpour train` "
                              "resumes from the last complete checkpoint")
    if marked:
        rank, kind, msg = sorted(marked)[0]
        return TrainingFailed(f"training failed on worker {rank}: {kind}: {msg}")
    text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    return TrainingFailed(f"training failed: {text}")


_HVD_FIRST_FAILED = re.compile(r"Process name: (\d+)\s+Exit code: (-?\d+)")


def _exit_reason(code: int) -> str:
    """Horovod's exit code of a rank's command: 128+N (or -N) is signal N; -1 means its Spark task
    could no longer be reached."""
    sig = -code if code < -1 else code - 128 if code > 128 else 0
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = ": out of memory, preempted, or killed from outside" if name == "SIGKILL" else ""
        return f"its process was killed by {name}{hint}"
    if code == -1:
        return "its Spark task could no longer be reached"
    return f"its process exited with code {code} without reporting an error"


class _Tee:
    """A text stream that forwards the workers' output and remembers their marked error lines."""

    _MARK = re.compile(rf"{RANK_ERROR} rank=(\d+) kind=([\w.]+): (.*)")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.errors: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            for m in self._MARK.finditer(text):
                self.errors.append((int(m.group(1)), m.group(2), m.group(3).strip()))
            try:
                self.stream.write(text)
            except (ValueError, OSError):
                pass
        return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (ValueError, OSError):
            pass


def finish(cfg: Config, prepared: PreparedData, plan: RankPlan,
           results: list[dict[str, Any]]) -> dict[str, Any]:
    """Check the ranks agree, write history and model card into the staged model, publish it."""
    rank0 = results[0]
    sums = [r["weights_sha256"] for r in results]
    if len(set(sums)) != 1:
        raise TrainingFailed(f"training finished with different weights on different workers {sums}; "
                             "the model was not published")
    t = cfg.training
    staging = plan.staging
    history = {"epochs": rank0["history"], "initial_epoch": rank0["initial_epoch"],
               "steps_per_epoch": plan.steps_per_epoch, "batch_size": t.batch_size, "workers": t.workers,
               "monitor": plan.monitor}
    ModelArtifact(staging).write_history(history)
    tb = plan.tensorboard
    if storage.is_local(tb) and storage.exists(tb) and storage.is_local(staging):
        shutil.copytree(storage.local_path(tb), os.path.join(storage.local_path(staging), TENSORBOARD),
                        dirs_exist_ok=True)
    history_dir = _copy_entity_history(prepared, staging)
    now = dt.datetime.now(dt.UTC)
    digest = hashlib.sha256(f"{prepared.data_version}/{plan.run_key}/{sums[0]}".encode()).hexdigest()[:8]
    version = f"{now:%Y%m%dT%H%M%SZ}-{digest}"
    train = plan.train
    speeds = [h["examples_per_s"] for h in rank0["history"] if h.get("examples_per_s")]
    card = {
        "name": cfg.name,
        "data_version": prepared.data_version,
        "model_version": version,
        "created_at": now.isoformat(timespec="seconds"),
        "training": {
            "workers": t.workers,
            "epochs_completed": rank0["epochs_completed"],
            "devices_per_worker": t.devices_per_worker,
            "placement": rank0["placement"],
            "devices": rank0["devices"],
            "initial_epoch": rank0["initial_epoch"],
            "stopped_early": rank0["stopped_early"],
            "best_epoch": rank0["best_epoch"],
            "exported_weights": rank0["exported_weights"],
            "monitor": plan.monitor,
            "steps_per_epoch": plan.steps_per_epoch,
            "budget": plan.budget.as_dict(),
            "batch_size_per_worker": t.batch_size,
            "global_batch_size": t.batch_size * t.workers,
            "learning_rate": t.learning_rate,
            "scaled_learning_rate": t.learning_rate * t.workers,
            "optimizer": rank0["optimizer"],
            "allreduce_groups": t.allreduce_groups,
            "optimizer_iterations": rank0["optimizer_iterations"],
            "threads_per_worker": rank0["threads"],
            "examples_per_s": round(statistics.median(speeds), 1) if speeds else None,
            "imbalance": {"strategy": t.imbalance, "keep_negatives": plan.keep_negatives,
                          "positive_weight": plan.positive_weight, "logit_shift": plan.logit_shift,
                          "train_base_rate": train.positives / train.rows if train.rows else None},
            "rank_weights_sha256": sums,
            "final_metrics": rank0["history"][-1] if rank0["history"] else {},
        },
        "signatures": rank0["signatures"],
        # reason codes (training/explain.py): feature names in the explain signature's order, baseline score
        "explain": rank0["explain"],
        "features": {"model_inputs": list(rank0["signatures"].get("serve_features", [])),
                     "raw_inputs": sorted(prepared.feature_state.get("raw_inputs") or {})},
        "config": cfg.to_public_dict(),
        "frameworks": rank0["frameworks"],
        "entity_history": history_dir,
        # what score measures drift against (features/drift.py); evaluate adds the score's
        "drift_reference": prepared.manifest.get("drift_reference"),
    }
    ModelArtifact(staging).write_card(card)
    model_url = RunLayout(cfg.output.path).model
    where = storage.publish_dir(staging, model_url, version)
    LOG.info("model %s published: %s -> %s", version, model_url, where)
    return card


def _copy_entity_history(prepared: PreparedData, staging: str) -> dict[str, Any] | None:
    """The model carries the entity history of its data version (``entity_history/``): scoring needs
    it for window features, and the model outlives the prepared data it was trained on."""
    meta = prepared.manifest.get("entity_history")
    if not meta:
        return None
    storage.copy_dir(PreparedLayout(prepared.url).entity_history, storage.join(staging, ENTITY_HISTORY))
    return {k: v for k, v in meta.items() if k != "path"} | {"path": ENTITY_HISTORY,
                                                            "data_version": prepared.data_version}
