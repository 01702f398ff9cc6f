"""One Horovod rank of ``downpour train``: set up the process, build and compile the model, resume,
fit, and (rank 0) export.

``rank_main`` is what ``horovod.spark.run`` pickles to every worker with the driver's ``RankPlan``.
The steps, in order: ``_configure_process`` (thread limits and devices, before TensorFlow starts),
``_compiled`` (the model and its distributed optimizer), ``_resume`` (rank 0's checkpoint, broadcast
to every rank), ``_fit`` (Keras ``fit`` with the run's callbacks), then on rank 0 ``_export_best``
(the best or last weights as a SavedModel in the plan's staging directory) and ``_description``
(what the driver writes into the model card).

Nothing here imports TensorFlow at module level: a rank must set its thread limits first.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from downpour import storage
from downpour.artifact import TENSORBOARD, ModelArtifact
from downpour.config import Config
from downpour.errors import ConfigError
from downpour.logs import LOG, timed
from downpour.training.checkpoints import CheckpointStore
from downpour.training.input import InputSpec, ReadOptions, SplitInfo, share_bytes
from downpour.training.plan import RankPlan

# thresholds of the train/val AUCs (callbacks.SpreadAUC); evenly spaced ones update in O(batch + thresholds)
METRIC_THRESHOLDS = 5000
BASELINE_ROWS = 4096  # train rows whose mean representation is the reason codes' baseline
RANK_ERROR = "DOWNPOUR-RANK-ERROR"  # the marked line a failing rank prints (training/train.py reads it)
HVD_SHUTDOWN = "Horovod has been shut down"  # what a rank's collective raises once a peer is gone


def rank_main(plan: RankPlan) -> dict[str, Any]:
    """Entry point of a rank: any error leaves as one marked line on stderr, then re-raised."""
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
    try:
        return _train_rank(plan, rank)
    except BaseException as exc:
        msg = " ".join(str(exc).split()) or exc.__class__.__name__
        kind = exc.__class__.__name__
        if HVD_SHUTDOWN in msg:  # a peer went away; TensorFlow wraps Horovod's error in its own
            kind, msg = "HorovodInternalError", HVD_SHUTDOWN
        print(f"\n{RANK_ERROR} rank={rank} kind={kind}: {msg[:2000]}", file=sys.stderr, flush=True)
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


def train_read_options(plan: RankPlan, t: Any, rank: int, size: int, train: SplitInfo, first_epoch: int,
                       readers: int, **extra: Any) -> ReadOptions:
    """How rank ``rank`` of ``size`` reads the train split: its shard, seeded epochs of exactly the
    plan's ``steps_per_epoch`` whole batches from ``first_epoch`` on (the one definition, tested).
    The rank's row groups are decoded once and replayed every epoch, in the order petastorm would read
    them, when its share (bounded from the manifest) fits in ``training.input_cache_mb``."""
    shard = train.row_groups >= size
    if "cache" not in extra:
        need = share_bytes(train, InputSpec.from_feature_state(plan.feature_state), rank, size, shard)
        extra["cache"] = t.input_cache_mb > 0 and need <= t.input_cache_mb * 2**20
    return ReadOptions(
        batch_size=t.batch_size, rank=rank, size=size, shard=shard, num_epochs=None,
        shuffle=True, window_row_groups=t.shuffle_window_row_groups, seed=t.seed,
        keep_negatives=plan.keep_negatives, positive_weight=plan.positive_weight,
        reader_workers=readers, drop_remainder=True, epoch_steps=plan.steps_per_epoch,
        first_epoch=first_epoch, row_groups=train.row_groups, **extra)


@dataclass(frozen=True)
class _Resumed:
    """Where this run starts: the checkpoint store, rank 0's training state (None on the others or
    when starting fresh), the first round to train, and whether nothing is left to train."""

    store: CheckpointStore
    state: dict[str, Any] | None
    initial_epoch: int
    finished: bool


def _train_rank(plan: RankPlan, rank: int) -> dict[str, Any]:
    from downpour.logs import setup_logging

    setup_logging()
    cfg = plan.cfg()
    threads, devices = _configure_process(cfg)

    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    hvd.init()
    size = hvd.size()
    model, optimizer = _compiled(plan, cfg, rank, size, devices)
    if rank == 0:
        from downpour.training.placement import describe

        LOG.info("rank 0: %d thread(s), %s", threads, describe(model))
    resumed = _resume(plan, cfg, model, optimizer, rank, size)
    state = resumed.state
    tb_dir = (tempfile.mkdtemp(prefix="downpour-tb-") if not storage.is_local(plan.tensorboard)
              else storage.local_path(plan.tensorboard))
    if not resumed.finished:
        state = _fit(plan, cfg, model, rank, size, resumed, tb_dir)

    result: dict[str, Any] = {
        "rank": rank,
        "weights_sha256": weights_sha256(model),
        "optimizer_iterations": int(optimizer.iterations.numpy()),
    }
    if rank != 0:
        return result

    state = state or {}
    exported, artifact = _export_best(plan, cfg, model, resumed.store, state)
    if not storage.is_local(plan.tensorboard) and os.listdir(tb_dir):
        # TensorBoard cannot write to every remote scheme: this run's logs travel with the model
        storage.upload_dir(tb_dir, storage.join(plan.staging, TENSORBOARD))
    from downpour.training.placement import parameter_bytes_by_device

    result.update({
        "history": state.get("history", []),
        "initial_epoch": resumed.initial_epoch,
        "epochs_completed": int(state.get("epoch", resumed.initial_epoch)),
        "stopped_early": bool(state.get("stopped_early")),
        "best_epoch": (state.get("best") or {}).get("epoch"),
        "exported_weights": exported,
        "placement": parameter_bytes_by_device(model),
        "devices": devices or [d.name for d in tf.config.list_logical_devices()
                               if d.device_type in ("GPU",)] or ["/CPU:0"],
        "threads": threads,
        "optimizer": "Adam (tf.keras.optimizers.legacy) + hvd.DistributedOptimizer",
        "signatures": artifact["signatures"],
        "explain": artifact["explain"],
        "frameworks": _frameworks(),
    })
    return result


def _compiled(plan: RankPlan, cfg: Config, rank: int, size: int, devices: list[str]) -> tuple[Any, Any]:
    """The model (placed on ``devices``) compiled with Horovod's distributed Adam, slots created."""
    import tensorflow as tf

    from downpour.training import callbacks as cb
    from downpour.training.model import build_model
    from downpour.training.placement import sparse_as_dense

    t = cfg.training
    tf.keras.utils.set_random_seed(t.seed + 1000 * rank)
    # dropout draws from tf.random.Generator state that cb.EpochSeededDropout reseeds every epoch,
    # so a resumed run draws the masks an uninterrupted one draws
    tf.keras.backend.experimental.enable_tf_random_generator()
    model = build_model(plan.feature_state, t, devices or None)
    plain_allreduce_tracing()
    optimizer = distributed_optimizer(tf.keras.optimizers.legacy.Adam(learning_rate=t.learning_rate * size),
                                      model, t.allreduce_groups, sparse_as_dense(model, t.batch_size, size))
    model.compile(
        optimizer=optimizer,
        loss=tf.keras.losses.BinaryCrossentropy(),
        metrics=[cb.SpreadAUC(num_thresholds=METRIC_THRESHOLDS, name="auc"),
                 cb.SpreadAUC(num_thresholds=METRIC_THRESHOLDS, curve="PR", name="pr_auc")],
        # the metrics are unweighted on purpose (the loss takes the rows' weights): said here, so Keras
        # does not warn at every validation that the weights reach no metric
        weighted_metrics=[],
    )
    # Create the optimizer's slots now, in one fixed order on every rank. Left to the first step, a
    # rank that restored a checkpoint creates them in restoration order instead, and Horovod's
    # broadcast of optimizer.variables() (paired by position) then deadlocks on mismatched tensors.
    optimizer._create_all_weights(model.trainable_variables)
    return model, optimizer


def distributed_optimizer(inner: Any, model: Any, groups: int, dense: bool) -> Any:
    """``inner`` wrapped to average every step's gradients across the ranks before applying them.

    ``groups`` (``training.allreduce_groups``): 1 puts the gradients in one grouped collective, so a step
    costs one negotiation and one fused reduction; n splits them into up to n groups. Horovod's default
    (0 here) negotiates each gradient on its own as it is ready and fuses whatever is ready within a
    cycle: for the fraud model, 24 negotiations and about two reductions a step (benchmarks/README.md
    "Investigation: data parallelism on two cores"). ``dense``: embedding gradients densified
    (``placement.sparse_as_dense``); otherwise the tables' sparse gradients form one group of their own
    (two grouped allgathers), because Horovod 0.28.1's grouped allreduce fails on a group that mixes
    sparse and dense gradients. Horovod matches gradients to groups by variable name.
    """
    import horovod.tensorflow.keras as hvd

    from downpour.training.placement import embedding_tables

    if not groups:
        return hvd.DistributedOptimizer(inner, sparse_as_dense=dense)
    weights = list(model.trainable_weights)
    if len({v.name for v in weights}) != len(weights):
        raise RuntimeError("two trainable weights share a name: Horovod could not tell their gradients apart")
    shards = set() if dense else {id(v) for table in embedding_tables(model) for v in table.shards}
    rest = [v for v in weights if id(v) not in shards]
    step = max(1, -(-len(rest) // groups))  # ceil: at most `groups` groups, none empty
    split = [rest[i:i + step] for i in range(0, len(rest), step)]
    if shards:
        split.append([v for v in weights if id(v) in shards])
    return hvd.DistributedOptimizer(inner, sparse_as_dense=dense, groups=split)


def plain_allreduce_tracing() -> None:
    """Have Horovod trace its gradient allreduce without AutoGraph, in this process, from now on.

    Horovod wraps the allreduce of every gradient in a ``tf.function`` with AutoGraph on
    (``horovod.tensorflow._make_subgraph``). That code branches on Python values only (the gradient's
    type, the op, the group), so AutoGraph's rewrite of about 17 Horovod functions yields the graph that
    plain tracing yields, and it made a short Keras ``fit`` (14 steps, the first step's tracing most of it)
    3.0-3.2 s against 1.6 s with plain Adam (benchmarks/README.md, "Investigation: a small run's fixed
    costs"). Call it before the process's first ``hvd.DistributedOptimizer``: Horovod caches the
    allreduce function it builds (per name, op, devices and the like), and a cached one keeps AutoGraph.
    A Horovod without that hook is left as it is.
    """
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    make = getattr(hvd_tf, "_make_subgraph", None)
    if make is None or getattr(make, "plain_tracing", False):
        return

    def subgraph(fn: Any) -> Any:
        return tf.function(fn, autograph=False)

    subgraph.plain_tracing = True  # type: ignore[attr-defined]
    hvd_tf._make_subgraph = subgraph


def _resume(plan: RankPlan, cfg: Config, model: Any, optimizer: Any, rank: int, size: int) -> _Resumed:
    """Rank 0 restores the last checkpoint (unless fresh); every rank learns where to start and takes
    rank 0's weights and optimizer state."""
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    t = cfg.training
    store = CheckpointStore(plan.checkpoints, plan.run_key)
    state = None
    if rank == 0 and not plan.fresh:
        state = store.latest()
        if state is not None:
            store.restore(model, optimizer, state)
            # the learning rate follows this run's worker count (warm-up adjusts it from here)
            tf.keras.backend.set_value(optimizer.lr, t.learning_rate * size)
            LOG.info("resuming after epoch %d from %s", state["epoch"], store.url)
    state = hvd_tf.broadcast_object(state, root_rank=0, name="downpour_resume_state")
    initial_epoch = int(state["epoch"]) if state else 0
    finished = bool(state and (state.get("stopped_early") or initial_epoch >= plan.budget.rounds))
    if size > 1:
        # Every rank starts from rank 0's weights *and* optimizer state (step, Adam moments), before
        # the first step. Horovod's BroadcastGlobalVariablesCallback broadcasts only after batch 0, so
        # a resumed run's first step would average rank 0's gradient with gradients of the other
        # ranks' fresh weights, and rank 0's moments would keep that mixed step.
        hvd_tf.broadcast_variables(model.variables, root_rank=0)
        hvd_tf.broadcast_variables(optimizer.variables(), root_rank=0)
    return _Resumed(store, state, initial_epoch, finished)


def _fit(plan: RankPlan, cfg: Config, model: Any, rank: int, size: int, resumed: _Resumed,
         tb_dir: str) -> dict[str, Any] | None:
    """Keras ``fit`` over this rank's shard for the rest of the budget; returns rank 0's training state."""
    import tensorflow as tf

    from downpour.training import callbacks as cb
    from downpour.training.input import make_dataset

    t = cfg.training
    spec = InputSpec.from_feature_state(plan.feature_state)
    train, val = plan.train, plan.val
    readers = 1 if t.deterministic else t.reader_workers
    state = resumed.state
    train_opts = train_read_options(plan, t, rank, size, train, resumed.initial_epoch, readers)
    if not train_opts.cache:
        LOG.info("input: rank %d streams its train shards every epoch (its share, up to %.0f MiB, exceeds "
                 "training.input_cache_mb=%d)", rank, share_bytes(train, spec, rank, size, train_opts.shard) / 2**20,
                 t.input_cache_mb)
    train_ds = make_dataset(train.url, spec, train_opts)
    val_ds = None
    if val.rows > 0:
        val_ds = make_dataset(val.url, spec, ReadOptions(
            batch_size=t.batch_size, rank=rank, size=size, shard=val.row_groups >= size, num_epochs=1,
            shuffle=False, seed=t.seed, reader_workers=readers))
    # no BroadcastGlobalVariablesCallback: the ranks were made identical in _resume, before step 1
    callbacks = step_callbacks(plan, t.seed, t.learning_rate, rank, size)
    early = None
    if t.early_stopping_patience > 0:
        early = cb.ResumableEarlyStopping(plan.monitor, t.early_stopping_patience,
                                          (state or {}).get("early_stopping"))
        callbacks.append(early)
    recorder = None
    if rank == 0:
        recorder = cb.EpochRecorder(resumed.store, state or {}, plan.monitor, early, t.batch_size * size)
        callbacks.append(recorder)
        callbacks.append(tf.keras.callbacks.TensorBoard(log_dir=tb_dir, update_freq="epoch", profile_batch=0,
                                                        write_graph=False))
        callbacks.append(tf.keras.callbacks.ProgbarLogger(count_mode="steps"))
        if plan.fail_after_epoch:
            callbacks.append(cb.FailAfterEpoch(plan.fail_after_epoch))
    kill = plan.kill_worker
    if kill and kill["rank"] == rank:
        callbacks.append(cb.KillMidEpoch(kill["epoch"], kill["batch"]))
    model.fit(train_ds, steps_per_epoch=plan.steps_per_epoch, epochs=plan.budget.rounds,
              initial_epoch=resumed.initial_epoch, validation_data=val_ds, callbacks=callbacks,
              verbose=2 if rank == 0 else 0)
    return recorder.state if recorder is not None else state


def step_callbacks(plan: RankPlan, seed: int, learning_rate: float, rank: int, size: int) -> list[Any]:
    """The per-step callbacks of every rank's ``fit``; the training benchmarks time them too."""
    from downpour.training import callbacks as cb

    return [cb.PooledMetrics(), cb.EpochSeededDropout(seed, rank),
            cb.StepLearningRate(plan.budget, learning_rate, size)]


def weights_sha256(model: Any) -> str:
    """One digest of every weight, in the model's order: equal digests, equal models."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(w.tobytes())
    return digest.hexdigest()


def _export_best(plan: RankPlan, cfg: Config, model: Any, store: CheckpointStore,
                 state: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Rank 0: the best weights (early stopping) or the last, unplaced, exported to the staging
    directory with the reason codes' baseline from train rows; returns ("best"|"last", export result)."""
    from downpour.training.export import export_saved_model
    from downpour.training.input import iter_batches

    t = cfg.training
    exported = "last"
    if t.early_stopping_patience > 0 and state.get("best") and store.restore_best(model, state):
        exported = "best"
    export_model = _unplaced(model, plan.feature_state, t)
    spec = InputSpec.from_feature_state(plan.feature_state)
    check = next(iter_batches(plan.val.url if plan.val.rows else plan.train.url, spec, ReadOptions(
        batch_size=256, num_epochs=1, shuffle=False, reader_workers=1)))
    display = {safe: raw for raw, safe in cfg.names.items()}
    baseline = _baseline_rows(plan.train.url, spec)
    target = ModelArtifact(plan.staging).saved_model
    with timed("export SavedModel"):
        if storage.is_local(target):
            return exported, export_saved_model(export_model, plan.feature_state, plan.logit_shift,
                                                storage.local_path(target), check, baseline, display)
        tmp = tempfile.mkdtemp(prefix="downpour-export-")
        try:
            artifact = export_saved_model(export_model, plan.feature_state, plan.logit_shift,
                                          os.path.join(tmp, "sm"), check, baseline, display)
            storage.upload_dir(os.path.join(tmp, "sm"), target)
            return exported, artifact
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _unplaced(model: Any, state: dict[str, Any], t: Any) -> Any:
    """The model to export: device-free (a placed or sharded model's weights copied into a plain one),
    so the SavedModel runs on any scorer, GPU or not."""
    if t.devices_per_worker == 1 and not t.placement:
        return model
    from downpour.training.model import build_model, transfer_weights

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


def _keras_version(tf: Any) -> str:
    """The Keras that ``tf.keras`` is: Keras 2 itself on TF 2.15, ``tf_keras`` on TF 2.16+ with
    ``TF_USE_LEGACY_KERAS=1`` (Databricks 15.4 LTS ML), where ``import keras`` would name Keras 3."""
    if tf.keras.__name__.startswith("tf_keras"):
        import tf_keras

        return f"tf_keras {tf_keras.__version__}"
    import keras

    return str(keras.__version__)


def _frameworks() -> dict[str, str]:
    """The versions the model was trained with (into the model card)."""
    import horovod
    import numpy
    import petastorm
    import pyarrow
    import pyspark
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": _keras_version(tf),
            "horovod": horovod.__version__, "petastorm": petastorm.__version__, "pyarrow": pyarrow.__version__,
            "pyspark": pyspark.__version__, "numpy": numpy.__version__}
