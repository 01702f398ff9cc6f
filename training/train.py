"""``downpour train``: data-parallel Keras training with Horovod on Spark, resumable, then export.

The driver (this process) resolves ``prepared/`` once, plans the run from the manifest (steps per
epoch, imbalance handling, checkpoint key) and launches ``training.workers`` Horovod processes with
``horovod.spark.run`` over gloo, one per Spark task. Each rank pins its CPU threads (and the GPUs
Spark gave its task), reads its own row groups through ``training.input``, and trains with
``hvd.DistributedOptimizer``; rank 0 writes per-epoch checkpoints, TensorBoard logs and, at the end,
the SavedModel. The driver then writes ``history.json`` and ``model_card.json`` beside it and
publishes the model directory in one step. A re-run resumes from the last complete checkpoint.

Nothing here imports TensorFlow at module level: the rank function is pickled to the workers, and
they must set their thread limits before TensorFlow starts.

Long: the driver's plan and finish and one rank's training loop share private helpers; the rank loop
is the next candidate for its own module.
"""

from __future__ import annotations

import _thread
import datetime as dt
import hashlib
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from dataclasses import asdict
from typing import Any

from downpour import storage
from downpour.artifact import ENTITY_HISTORY, TENSORBOARD, ModelArtifact
from downpour.config import Config
from downpour.errors import ConfigError, DataContractError, DownpourError
from downpour.layout import PreparedLayout, RunLayout
from downpour.logs import LOG, timed
from downpour.training.budget import Budget, plan_budget
from downpour.training.checkpoints import CheckpointStore, run_key
from downpour.training.export import keep_negatives, logit_shift, positive_weight
from downpour.training.input import PreparedData, ReadOptions, SplitInfo, expected_train_rows, open_prepared

FAIL_ENV = "DOWNPOUR_FAIL_AFTER_EPOCH"
KILL_ENV = "DOWNPOUR_KILL_WORKER"  # rank:epoch:batch -> that rank SIGKILLs itself mid-epoch
# thresholds of the train/val AUCs (callbacks.SpreadAUC); evenly spaced ones update in O(batch + thresholds)
METRIC_THRESHOLDS = 5000
BASELINE_ROWS = 4096  # train rows whose mean representation is the reason codes' baseline
_RANK_ERROR = "DOWNPOUR-RANK-ERROR"
_COMM_ERRORS = ("HorovodInternalError", "ConnectionResetError", "BrokenPipeError")
_HVD_SHUTDOWN = "Horovod has been shut down"  # what a rank's collective raises once a peer is gone


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
        rounds = plan["budget"]["rounds"]
        try:
            store = CheckpointStore(plan["checkpoints"], plan["run_key"])
            workers = t.workers
            if fresh:
                store.clear()
                storage.delete_dir(plan["tensorboard"])
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
            storage.delete_dir(plan["staging"])
            raise
    card["training"]["duration_s"] = round(took.get("seconds", 0.0), 1)
    return card


def make_plan(cfg: Config, prepared: PreparedData, fresh: bool) -> dict[str, Any]:
    """Everything a rank needs, as plain data (it is pickled to the workers)."""
    t = cfg.training
    train, val = prepared.split("train"), prepared.split("val")
    if train.rows <= 0:
        raise DataContractError(f"{train.url}: the train split is empty")
    if t.imbalance != "none" and train.positives == 0:
        LOG.warning("train: no positives in the train split; training.imbalance=%s has nothing to balance",
                    t.imbalance)
    keep = keep_negatives(t)
    pos_w = positive_weight(t, train.positives, train.negatives)
    budget = plan_budget(t, expected_train_rows(train, keep))
    steps = budget.round_steps
    monitor = t.early_stopping_metric
    if monitor.startswith("val_") and val.rows == 0:
        LOG.warning("train: the val split is empty; early stopping watches %s instead of %s", monitor[4:], monitor)
        monitor = monitor[4:]
    for split in (train, val):
        if 0 < split.row_groups < t.workers:
            LOG.warning("train: %s has %d row group(s) for %d workers; every worker reads all of it "
                        "(raise shards.min_row_groups_per_worker)", split.url, split.row_groups, t.workers)
    layout = RunLayout(cfg.output.path)
    plan = {
        "config": cfg.model_dump(mode="json", by_alias=True),
        "prepared_url": prepared.url,
        "data_version": prepared.data_version,
        "feature_state": prepared.feature_state,
        "train": asdict(train),
        "val": asdict(val),
        "steps_per_epoch": steps,
        "keep_negatives": keep,
        "positive_weight": pos_w,
        "logit_shift": logit_shift(t, pos_w),
        "monitor": monitor,
        "checkpoints": layout.checkpoints,
        "tensorboard": layout.tensorboard,
        "staging": storage.staging_dir(layout.model),
        "run_key": run_key(cfg, prepared.data_version, budget),
        "budget": budget.as_dict(),
        "fresh": fresh,
        "fail_after_epoch": _fail_after_epoch(),
        "kill_worker": _kill_worker(t.workers, budget.rounds, steps),
    }
    LOG.info("train plan: data_version=%s, %d train rows (%d positives); budget %d steps (%d rounds of %d, "
             "given in %s; a pass is %d steps) x %d workers x batch %d = %d examples; learning rate %s, "
             "warm-up %d steps; imbalance=%s (keep negatives %.3g, positive weight %.3g)",
             prepared.data_version, train.rows, train.positives, budget.steps, budget.rounds, steps,
             budget.said_as, budget.pass_steps, t.workers, t.batch_size, budget.examples, budget.schedule,
             budget.warmup_steps, t.imbalance, keep, pos_w)
    return plan


def _fail_after_epoch() -> int | None:
    """The recovery-drill hook: ``DOWNPOUR_FAIL_AFTER_EPOCH=N`` fails rank 0 after epoch N."""
    text = os.environ.get(FAIL_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{FAIL_ENV}: expected an epoch number >= 1, got {text!r}")
    return int(text)


def _kill_worker(workers: int, epochs: int, steps: int) -> dict[str, int] | None:
    """The worker-loss drill: ``DOWNPOUR_KILL_WORKER=rank:epoch:batch`` makes that rank kill itself
    (SIGKILL) after ``batch`` steps of round ``epoch`` (1-based; a round is a Keras epoch). A drill
    that could never fire is an error."""
    text = os.environ.get(KILL_ENV, "").strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d+):(\d+):(\d+)", text)
    if not m:
        raise ConfigError(f"{KILL_ENV}: expected rank:epoch:batch (e.g. 1:2:3), got {text!r}")
    rank, epoch, batch = (int(g) for g in m.groups())
    if rank >= workers:
        raise ConfigError(f"{KILL_ENV}: rank {rank} does not exist with training.workers={workers}")
    if not 1 <= epoch <= epochs:
        raise ConfigError(f"{KILL_ENV}: epoch {epoch} is not in 1..{epochs} (the budget's validation rounds)")
    if not 1 <= batch <= steps:
        raise ConfigError(f"{KILL_ENV}: batch {batch} is not in 1..{steps} (the steps per round)")
    return {"rank": rank, "epoch": epoch, "batch": batch}


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


def launch(spark: Any, plan: dict[str, Any], workers: int, timeout_s: int) -> list[dict[str, Any]]:
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
                _rank_main, args=(plan,), num_proc=workers, start_timeout=timeout_s, use_gloo=True,
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

    _MARK = re.compile(rf"{_RANK_ERROR} rank=(\d+) kind=([\w.]+): (.*)")

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


def finish(cfg: Config, prepared: PreparedData, plan: dict[str, Any],
           results: list[dict[str, Any]]) -> dict[str, Any]:
    """Check the ranks agree, write history and model card into the staged model, publish it."""
    rank0 = results[0]
    sums = [r["weights_sha256"] for r in results]
    if len(set(sums)) != 1:
        raise TrainingFailed(f"training finished with different weights on different workers {sums}; "
                             "the model was not published")
    t = cfg.training
    staging = plan["staging"]
    history = {"epochs": rank0["history"], "initial_epoch": rank0["initial_epoch"],
               "steps_per_epoch": plan["steps_per_epoch"], "batch_size": t.batch_size, "workers": t.workers,
               "monitor": plan["monitor"]}
    ModelArtifact(staging).write_history(history)
    tb = plan["tensorboard"]
    if storage.is_local(tb) and storage.exists(tb) and storage.is_local(staging):
        shutil.copytree(storage.local_path(tb), os.path.join(storage.local_path(staging), TENSORBOARD),
                        dirs_exist_ok=True)
    history_dir = _copy_entity_history(prepared, staging)
    now = dt.datetime.now(dt.UTC)
    digest = hashlib.sha256(f"{prepared.data_version}/{plan['run_key']}/{sums[0]}".encode()).hexdigest()[:8]
    version = f"{now:%Y%m%dT%H%M%SZ}-{digest}"
    train = SplitInfo(**plan["train"])
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
            "monitor": plan["monitor"],
            "steps_per_epoch": plan["steps_per_epoch"],
            "budget": plan["budget"],
            "batch_size_per_worker": t.batch_size,
            "global_batch_size": t.batch_size * t.workers,
            "learning_rate": t.learning_rate,
            "scaled_learning_rate": t.learning_rate * t.workers,
            "optimizer": rank0["optimizer"],
            "optimizer_iterations": rank0["optimizer_iterations"],
            "threads_per_worker": rank0["threads"],
            "examples_per_s": round(statistics.median(speeds), 1) if speeds else None,
            "imbalance": {"strategy": t.imbalance, "keep_negatives": plan["keep_negatives"],
                          "positive_weight": plan["positive_weight"], "logit_shift": plan["logit_shift"],
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


# ==== worker (one Horovod rank) =====================================================================
def _rank_main(plan: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a rank: any error leaves as one marked line on stderr, then re-raised."""
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
    try:
        return _train_rank(plan, rank)
    except BaseException as exc:
        msg = " ".join(str(exc).split()) or exc.__class__.__name__
        kind = exc.__class__.__name__
        if _HVD_SHUTDOWN in msg:  # a peer went away; TensorFlow wraps Horovod's error in its own
            kind, msg = "HorovodInternalError", _HVD_SHUTDOWN
        print(f"\n{_RANK_ERROR} rank={rank} kind={kind}: {msg[:2000]}", file=sys.stderr, flush=True)
        raise


def _configure_process(cfg: Config) -> tuple[int, list[str]]:
    """Thread limits and device pinning; must run before TensorFlow initialises.

    GPUs: a Spark task that was given GPUs (``spark.task.resource.gpu.amount``) sees exactly those
    (``CUDA_VISIBLE_DEVICES`` from the task's resource addresses, set before TensorFlow loads CUDA);
    without Spark GPU scheduling, each rank takes its ``devices_per_worker`` GPUs by local rank.
    """
    t = cfg.training
    local_size = int(os.environ.get("HOROVOD_LOCAL_SIZE", "1"))
    local_rank = int(os.environ.get("HOROVOD_LOCAL_RANK", "0"))
    threads = t.threads_per_worker or max(1, (os.cpu_count() or 1) // local_size)
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    from horovod.spark.task import get_available_devices

    assigned = [str(a) for a in get_available_devices()]
    if assigned:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(assigned)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and not assigned and local_size > 1:
        k = t.devices_per_worker
        chosen = gpus[local_rank * k:(local_rank + 1) * k]
        if len(chosen) < k:
            raise ConfigError(f"training.devices_per_worker: {local_size} workers x {k} GPU(s) on one host, "
                              f"which has {len(gpus)}; give Spark tasks GPUs (spark.task.resource.gpu.amount)")
        tf.config.set_visible_devices(chosen, "GPU")
        gpus = chosen
    for g in gpus:
        tf.config.experimental.set_memory_growth(g, True)
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()
    devices: list[str] = []
    if t.devices_per_worker > 1 or t.placement:
        from downpour.training.placement import worker_devices

        devices = worker_devices(t.devices_per_worker)
    return threads, devices


def train_read_options(plan: dict[str, Any], t: Any, rank: int, size: int, train: Any, first_epoch: int,
                       readers: int, **extra: Any) -> ReadOptions:
    """How rank ``rank`` of ``size`` reads the train split: its shard, seeded epochs of exactly the
    plan's ``steps_per_epoch`` whole batches from ``first_epoch`` on (the one definition, tested)."""
    return ReadOptions(
        batch_size=t.batch_size, rank=rank, size=size, shard=train.row_groups >= size, num_epochs=None,
        shuffle=True, window_row_groups=t.shuffle_window_row_groups, seed=t.seed,
        keep_negatives=plan["keep_negatives"], positive_weight=plan["positive_weight"],
        reader_workers=readers, drop_remainder=True, epoch_steps=plan["steps_per_epoch"],
        first_epoch=first_epoch, **extra)


def _train_rank(plan: dict[str, Any], rank: int) -> dict[str, Any]:
    from downpour.logs import setup_logging

    setup_logging()
    cfg = Config.model_validate(plan["config"])
    t = cfg.training
    threads, devices = _configure_process(cfg)

    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from downpour.training import callbacks as cb
    from downpour.training.export import export_saved_model
    from downpour.training.input import InputSpec, iter_batches, make_dataset
    from downpour.training.model import build_model
    from downpour.training.placement import describe, parameter_bytes_by_device, sparse_as_dense

    hvd.init()
    size = hvd.size()
    tf.keras.utils.set_random_seed(t.seed + 1000 * rank)
    # dropout draws from tf.random.Generator state that cb.EpochSeededDropout reseeds every epoch,
    # so a resumed run draws the masks an uninterrupted one draws
    tf.keras.backend.experimental.enable_tf_random_generator()
    state_dict = plan["feature_state"]
    model = build_model(state_dict, t, devices or None)
    if rank == 0:
        LOG.info("rank 0: %d thread(s), %s", threads, describe(model))
    optimizer = hvd.DistributedOptimizer(
        tf.keras.optimizers.legacy.Adam(learning_rate=t.learning_rate * size),
        sparse_as_dense=sparse_as_dense(model, t.batch_size, size),
    )
    model.compile(
        optimizer=optimizer,
        loss=tf.keras.losses.BinaryCrossentropy(),
        metrics=[cb.SpreadAUC(num_thresholds=METRIC_THRESHOLDS, name="auc"),
                 cb.SpreadAUC(num_thresholds=METRIC_THRESHOLDS, curve="PR", name="pr_auc")],
    )
    # Create the optimizer's slots now, in one fixed order on every rank. Left to the first step, a
    # rank that restored a checkpoint creates them in restoration order instead, and Horovod's
    # broadcast of optimizer.variables() (paired by position) then deadlocks on mismatched tensors.
    optimizer._create_all_weights(model.trainable_variables)

    # resume: rank 0 reads the checkpoint, every rank learns where to start
    store = CheckpointStore(plan["checkpoints"], plan["run_key"])
    state = None
    if rank == 0 and not plan["fresh"]:
        state = store.latest()
        if state is not None:
            store.restore(model, optimizer, state)
            # the learning rate follows this run's worker count (warm-up adjusts it from here)
            tf.keras.backend.set_value(optimizer.lr, t.learning_rate * size)
            LOG.info("resuming after epoch %d from %s", state["epoch"], store.url)
    import horovod.tensorflow as hvd_tf

    state = hvd_tf.broadcast_object(state, root_rank=0, name="downpour_resume_state")
    initial_epoch = int(state["epoch"]) if state else 0
    budget = Budget.from_dict(plan["budget"])
    finished = bool(state and (state.get("stopped_early") or initial_epoch >= budget.rounds))
    if size > 1:
        # Every rank starts from rank 0's weights *and* optimizer state (step, Adam moments), before
        # the first step. Horovod's BroadcastGlobalVariablesCallback broadcasts only after batch 0, so
        # a resumed run's first step would average rank 0's gradient with gradients of the other
        # ranks' fresh weights, and rank 0's moments would keep that mixed step.
        hvd_tf.broadcast_variables(model.variables, root_rank=0)
        hvd_tf.broadcast_variables(optimizer.variables(), root_rank=0)

    spec = InputSpec.from_feature_state(state_dict)
    train, val = SplitInfo(**plan["train"]), SplitInfo(**plan["val"])
    readers = 1 if t.deterministic else t.reader_workers
    steps = plan["steps_per_epoch"]
    early = None
    remote_tb = not storage.is_local(plan["tensorboard"])
    tb_dir = tempfile.mkdtemp(prefix="downpour-tb-") if remote_tb else storage.local_path(plan["tensorboard"])
    if not finished:
        train_ds = make_dataset(train.url, spec, train_read_options(plan, t, rank, size, train, initial_epoch,
                                                                   readers))
        val_ds = None
        if val.rows > 0:
            val_ds = make_dataset(val.url, spec, ReadOptions(
                batch_size=t.batch_size, rank=rank, size=size, shard=val.row_groups >= size, num_epochs=1,
                shuffle=False, seed=t.seed, reader_workers=readers))
        # no BroadcastGlobalVariablesCallback: the ranks were made identical above, before step 1
        callbacks: list[Any] = [cb.PooledMetrics(), cb.EpochSeededDropout(t.seed, rank)]
        callbacks.append(cb.StepLearningRate(budget, t.learning_rate, size))
        if t.early_stopping_patience > 0:
            early = cb.ResumableEarlyStopping(plan["monitor"], t.early_stopping_patience,
                                              (state or {}).get("early_stopping"))
            callbacks.append(early)
        if rank == 0:
            callbacks.append(cb.EpochRecorder(store, state or {}, plan["monitor"], early, t.batch_size * size))
            callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=tb_dir, update_freq="epoch", profile_batch=0,
                                                            write_graph=False))
            callbacks.append(tf.keras.callbacks.ProgbarLogger(count_mode="steps"))
            if plan["fail_after_epoch"]:
                callbacks.append(cb.FailAfterEpoch(plan["fail_after_epoch"]))
        kill = plan.get("kill_worker")
        if kill and kill["rank"] == rank:
            callbacks.append(cb.KillMidEpoch(kill["epoch"], kill["batch"]))
        model.fit(train_ds, steps_per_epoch=steps, epochs=budget.rounds, initial_epoch=initial_epoch,
                  validation_data=val_ds, callbacks=callbacks, verbose=2 if rank == 0 else 0)
        if rank == 0:
            state = next(c for c in callbacks if isinstance(c, cb.EpochRecorder)).state

    weights = hashlib.sha256()
    for w in model.get_weights():
        weights.update(w.tobytes())
    result: dict[str, Any] = {
        "rank": rank,
        "weights_sha256": weights.hexdigest(),
        "optimizer_iterations": int(optimizer.iterations.numpy()),
    }
    if rank != 0:
        return result

    state = state or {}
    exported = "last"
    if t.early_stopping_patience > 0 and state.get("best") and store.restore_best(model, state):
        exported = "best"
    export_model = _unplaced(model, state_dict, t, build_model)
    check = next(iter_batches(val.url if val.rows else train.url, spec, ReadOptions(
        batch_size=256, num_epochs=1, shuffle=False, reader_workers=1)))
    from downpour.pipelines.ingest import column_names

    display = {safe: raw for raw, safe in column_names(cfg).items()}
    exported_model = _export(export_model, state_dict, plan, check, _baseline_rows(train.url, spec),
                             display, export_saved_model)
    if remote_tb and os.listdir(tb_dir):
        # TensorBoard cannot write to every remote scheme: this run's logs travel with the model
        storage.upload_dir(tb_dir, storage.join(plan["staging"], TENSORBOARD))
    history = state.get("history", [])
    import horovod
    import keras
    import petastorm
    import pyarrow
    import pyspark

    result.update({
        "history": history,
        "initial_epoch": initial_epoch,
        "epochs_completed": int(state.get("epoch", initial_epoch)),
        "stopped_early": bool(state.get("stopped_early")),
        "best_epoch": (state.get("best") or {}).get("epoch"),
        "exported_weights": exported,
        "placement": parameter_bytes_by_device(model),
        "devices": devices or [d.name for d in tf.config.list_logical_devices()
                               if d.device_type in ("GPU",)] or ["/CPU:0"],
        "threads": threads,
        "optimizer": "Adam (tf.keras.optimizers.legacy) + hvd.DistributedOptimizer",
        "signatures": exported_model["signatures"],
        "explain": exported_model["explain"],
        "frameworks": {"python": platform.python_version(), "tensorflow": tf.__version__,
                       "keras": keras.__version__, "horovod": horovod.__version__,
                       "petastorm": petastorm.__version__, "pyarrow": pyarrow.__version__,
                       "pyspark": pyspark.__version__, "numpy": __import__("numpy").__version__},
    })
    return result


def _unplaced(model: Any, state: dict[str, Any], t: Any, build_model: Any) -> Any:
    """The model to export: device-free (a placed or sharded model's weights copied into a plain one),
    so the SavedModel runs on any scorer, GPU or not."""
    if t.devices_per_worker == 1 and not t.placement:
        return model
    from downpour.training.model import transfer_weights

    plain = build_model(state, t.model_copy(update={"devices_per_worker": 1, "placement": {}}), None)
    transfer_weights(model, plain)
    return plain


def _baseline_rows(url: str, spec: Any, rows: int = BASELINE_ROWS) -> list[dict[str, Any]]:
    """The first ``rows`` train rows (shard columns): the reason codes' baseline (training/explain.py)."""
    from downpour.training.input import iter_batches

    out, seen = [], 0
    for batch in iter_batches(url, spec, ReadOptions(batch_size=512, num_epochs=1, shuffle=False,
                                                     reader_workers=1)):
        out.append(batch)
        seen += len(batch["label"])
        if seen >= rows:
            break
    return out


def _export(model: Any, state: dict[str, Any], plan: dict[str, Any], check: dict[str, Any],
            baseline: list[dict[str, Any]], display: dict[str, str], export_saved_model: Any) -> dict[str, Any]:
    target = ModelArtifact(plan["staging"]).saved_model
    with timed("export SavedModel"):
        if storage.is_local(target):
            return export_saved_model(model, state, plan["logit_shift"], storage.local_path(target), check,
                                      baseline, display)
        tmp = tempfile.mkdtemp(prefix="downpour-export-")
        try:
            exported = export_saved_model(model, state, plan["logit_shift"], os.path.join(tmp, "sm"), check,
                                          baseline, display)
            storage.upload_dir(os.path.join(tmp, "sm"), target)
            return exported
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
