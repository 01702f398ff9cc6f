"""Training through our input pipeline against training on in-memory tensors: ``train_vs_in_memory``.

    python -m benchmarks.train_in_memory --prepared /tmp/downpour-bench/full/prepare/small --repeats 3

One worker, one process, one model definition; the only difference between the three contenders is
where the batches come from:

* ``pipeline``: ``training.input.make_dataset`` over the prepared train shards with the options a rank
  uses (``training.rank.train_read_options``: shuffled windows of row groups, petastorm reader threads,
  epochs of exactly ``steps_per_epoch`` batches, dropped remainder). With the shipped
  ``training.input_cache_mb`` the rank's share fits, so petastorm decodes it once inside the first timed
  epoch of each ``fit`` and later epochs replay it (reshuffled) from memory;
* ``pipeline_streamed``: the same with ``training.input_cache_mb=0``: petastorm reopens and decodes the
  shards every epoch, what a rank whose share exceeds the budget does (``train_vs_in_memory_streamed``,
  reported);
* ``in_memory``: the same train rows, loaded once into numpy before anything is timed, cut into batches
  of the same size and served by ``tf.data.Dataset.from_tensor_slices`` over the batches, repeated and
  prefetched, with the same ``tf.data.Options`` as ``make_dataset`` (``training.input.dataset_options``).
  No per-row shuffle: the cheapest feed tf.data has, so it is the ceiling.

Each fits a model from ``training.rank._compiled`` (``training.model.build_model``, Horovod's
``DistributedOptimizer`` over Adam, the run's loss and metrics; Horovod initialised with one rank),
with the rank's per-step callbacks (``StepLearningRate``, ``PooledMetrics``, ``EpochSeededDropout``),
in a process whose TensorFlow threads were set by ``training.rank._configure_process`` (the
``training.threads_per_worker`` mechanism: cores / workers by default). Each contender has its own model
(same seed) so none retraces another's train function. Same batch size, same steps per epoch, same
epochs, no validation.

Timing: one untimed warm-up ``fit`` of one epoch per contender (traces the train step, starts the
thread pools, fills the page cache); then ``repeats`` rounds, each running every contender (the order
rotated every round), each timed as the wall time of ``model.fit(epochs=epochs)``, dataset objects built
before the clock (all lazy), iterator creation and reader start inside it for each (so the replaying
contender decodes its share again inside the first epoch of every timed ``fit``). examples/s =
steps_per_epoch x epochs x batch / seconds. ``train_vs_in_memory`` is the median over rounds of
pipeline / in-memory examples/s of the same round, with their (min, max).

It runs in a child process so TensorFlow's thread pools are set before TensorFlow starts (the
benchmark driver has TensorFlow loaded already).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(raw: str, prepared_out: str, repeats: int = 3, epochs: int = 3, workdir: str | None = None,
            *overrides: str) -> dict[str, Any]:
    """``train_vs_in_memory`` on the prepared data under ``prepared_out`` (a ``downpour prepare`` output).

    The config is ``conf/fraud.yaml`` (``benchmarks.common.fraud_config``) with one worker, every train
    row (``imbalance=none``), ``epochs`` and ``overrides``; the plan is ``training.plan.make_plan``'s.
    """
    from benchmarks.common import fraud_config, ratio_figure, summary
    from downpour.training.input import open_prepared
    from downpour.training.plan import make_plan

    cfg = fraud_config(raw, prepared_out, "training.workers=1", "training.imbalance=none",
                       f"training.epochs={epochs}", "training.early_stopping_patience=0",
                       "evaluation.baseline=false", *overrides)
    plan = make_plan(cfg, open_prepared(prepared_out), fresh=True)
    with tempfile.TemporaryDirectory(prefix="downpour-bench-inmem-", dir=workdir) as tmp:
        plan_path, out_path = os.path.join(tmp, "plan.pkl"), os.path.join(tmp, "result.json")
        with open(plan_path, "wb") as f:
            pickle.dump(plan, f)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        for var in ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"):
            env.pop(var, None)
        subprocess.run([sys.executable, "-m", "benchmarks.train_in_memory", "--child", plan_path, out_path,
                        str(repeats), str(epochs)], cwd=ROOT, env=env, check=True)
        with open(out_path) as f:
            child = json.load(f)
    s = child.pop("samples")
    ratio, ratio_spread = ratio_figure(s["pipeline"], s["in_memory"], 2)
    streamed, streamed_spread = ratio_figure(s["pipeline_streamed"], s["in_memory"], 2)
    return {
        **child,
        "repeats": repeats,
        "epochs": epochs,
        "examples_per_s": {k: summary(v, 0) for k, v in s.items()},
        "train_vs_in_memory": ratio,
        "train_vs_in_memory_spread": ratio_spread,
        "train_vs_in_memory_streamed": streamed,
        "train_vs_in_memory_streamed_spread": streamed_spread,
    }


def _child(plan_path: str, out_path: str, repeats: int, epochs: int) -> None:
    """In a fresh process: set threads, build both datasets and models, warm up, alternate, time."""
    from downpour.logs import LOG, setup_logging
    from downpour.training.rank import _compiled, _configure_process, step_callbacks, train_read_options

    setup_logging()
    with open(plan_path, "rb") as f:
        plan = pickle.load(f)
    cfg = plan.cfg()
    threads, devices = _configure_process(cfg)  # before TensorFlow starts: threads per worker

    import horovod.tensorflow.keras as hvd
    import numpy as np
    import tensorflow as tf

    from downpour.training.input import InputSpec, ReadOptions, dataset_options, iter_blocks, make_dataset

    hvd.init()
    t = cfg.training
    spec = InputSpec.from_feature_state(plan.feature_state)
    readers = 1 if t.deterministic else t.reader_workers
    batch, steps = t.batch_size, plan.steps_per_epoch

    # the same train rows, in memory (loaded before any clock; every row once, in file order)
    blocks = list(iter_blocks(plan.train.url, spec, ReadOptions(batch_size=batch, num_epochs=1, shuffle=False,
                                                               reader_workers=readers)))
    cols = [*spec.features, "label", "weight"]
    flat = {c: np.concatenate([b[c].reshape(-1) for b in blocks]) for c in cols}
    rows = len(flat["label"])
    full = (rows // batch) * batch
    batched = {c: v[:full].reshape(-1, batch) for c, v in flat.items()}
    del blocks, flat
    in_memory = tf.data.Dataset.from_tensor_slices(
        ({c: batched[c] for c in spec.features}, batched["label"], batched["weight"])
    ).repeat().with_options(dataset_options()).prefetch(tf.data.AUTOTUNE)
    pipeline = make_dataset(plan.train.url, spec, train_read_options(plan, t, 0, 1, plan.train, 0, readers))
    streamed = make_dataset(plan.train.url, spec, train_read_options(plan, t, 0, 1, plan.train, 0, readers,
                                                                     cache=False))
    datasets = {"pipeline": pipeline, "pipeline_streamed": streamed, "in_memory": in_memory}
    models = {name: _compiled(plan, cfg, 0, 1, devices)[0] for name in datasets}

    def fit(name: str, n_epochs: int) -> float:
        callbacks = step_callbacks(plan, t.seed, t.learning_rate, 0, 1)
        t0 = time.perf_counter()
        models[name].fit(datasets[name], steps_per_epoch=steps, epochs=n_epochs, callbacks=callbacks, verbose=0)
        return time.perf_counter() - t0

    for name in datasets:  # warm-up, untimed, the same for each
        fit(name, 1)
    samples: dict[str, list[float]] = {name: [] for name in datasets}
    seconds: dict[str, list[float]] = {name: [] for name in datasets}
    examples = steps * epochs * batch
    for i in range(repeats):
        names = list(datasets)
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            sec = fit(name, epochs)
            seconds[name].append(round(sec, 3))
            samples[name].append(examples / sec)
            LOG.info("bench train_vs_in_memory %s round %d/%d: %.0f examples/s", name, i + 1, repeats,
                     samples[name][-1])
    result = {
        "train_rows": plan.train.rows,
        "in_memory_rows": full,
        "batch_size": batch,
        "steps_per_epoch": steps,
        "examples_per_round": examples,
        "threads_per_worker": threads,
        "reader_workers": readers,
        "input_cache_mb": t.input_cache_mb,
        "pipeline_replays_from_memory": bool(train_read_options(plan, t, 0, 1, plan.train, 0, readers).cache),
        "warm_up": "one untimed fit of one epoch per contender",
        "timing_window": "wall time of model.fit(epochs) for each: iterator creation and reader start inside, "
                         "dataset objects (lazy) and the in-memory arrays built before",
        "seconds": seconds,
        "samples": samples,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", required=True, help="the raw data the prepared output was made from")
    p.add_argument("--prepared", required=True, help="a `downpour prepare` output.path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    os.environ.setdefault("DOWNPOUR_PII_SALT", "bench-salt-not-secret")
    print(json.dumps(measure(a.raw, a.prepared, a.repeats, a.epochs), indent=2))


if __name__ == "__main__":
    main()
