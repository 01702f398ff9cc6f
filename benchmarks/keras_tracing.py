"""The model's compile and first epoch in one fresh process, with or without AutoGraph's rule for Keras.

    python -m benchmarks.keras_tracing --conf conf/crm_telco.yaml --out /tmp/run/out [--without-rule]

A side-run tool (benchmarks/README.md, "Investigation: Keras 2 on TF 2.16"), not part of ``make bench``:
one rank's ``training.rank._compiled`` (Horovod initialised with one rank) and two one-epoch ``fit``s on
the prepared train shards under ``--out`` (a ``downpour prepare`` output.path) with the rank's read options
and per-step callbacks. ``--without-rule`` disables ``training.model.keras_internals_unconverted`` (what
TF 2.16 does for ``tf_keras`` on its own). Prints one JSON line: the seconds of the compile and of each
epoch, and the SHA-256 of the weights after them (the same with and without the rule). Run it once per
process and alternate: AutoGraph's caches make a second measurement in one process meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conf", required=True)
    p.add_argument("--out", required=True, help="a `downpour prepare` output.path")
    p.add_argument("--without-rule", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("DOWNPOUR_PII_SALT", "bench-salt-not-secret")

    import downpour.training.model as model_module
    from downpour.config import load_config
    from downpour.training.input import open_prepared
    from downpour.training.plan import make_plan
    from downpour.training.rank import (
        _compiled,
        _configure_process,
        step_callbacks,
        train_read_options,
        weights_sha256,
    )

    if a.without_rule:
        model_module.keras_internals_unconverted = lambda: False
    cfg = load_config(a.conf, [f"output.path={a.out}", "training.workers=1", "training.epochs=1"])
    plan = make_plan(cfg, open_prepared(a.out), fresh=True)
    cfg = plan.cfg()
    _, devices = _configure_process(cfg)  # before TensorFlow starts, as in a rank

    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    from downpour.training.input import InputSpec, make_dataset

    hvd.init()
    t = cfg.training
    dataset = make_dataset(plan.train.url, InputSpec.from_feature_state(plan.feature_state),
                           train_read_options(plan, t, 0, 1, plan.train, 0, 1))
    t0 = time.perf_counter()
    model = _compiled(plan, cfg, 0, 1, devices)[0]
    seconds = {"compile": time.perf_counter() - t0}
    for epoch in ("first_epoch", "second_epoch"):
        callbacks = step_callbacks(plan, t.seed, t.learning_rate, 0, 1)
        t0 = time.perf_counter()
        model.fit(dataset, steps_per_epoch=plan.steps_per_epoch, epochs=1, callbacks=callbacks, verbose=0)
        seconds[epoch] = time.perf_counter() - t0
    print(json.dumps({"tensorflow": tf.__version__, "keras": tf.keras.Model.train_step.__module__.split(".")[0],
                      "rule": not a.without_rule, "steps_per_epoch": plan.steps_per_epoch,
                      "seconds": {k: round(v, 2) for k, v in seconds.items()},
                      "weights_sha256": weights_sha256(model)}))


if __name__ == "__main__":
    main()
