"""AutoGraph leaves Keras' own code alone whichever package ``tf.keras`` is (``keras`` on TF 2.15,
``tf_keras`` on TF 2.16 with ``TF_USE_LEGACY_KERAS=1``, the Databricks 15.4 LTS ML mirror: ``make test-dbr``
runs this file there too). TF 2.16 does not list ``tf_keras`` itself, and rewriting Keras made the first
epoch about 8 times longer (``training.model.keras_internals_unconverted``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.autograph.core import config
from tensorflow.python.autograph.impl import api, conversion

from downpour.config import TrainingConfig
from downpour.training.model import build_model, keras_internals_unconverted

SPEC = {"version": 1, "numeric": [{"name": "n__x"}], "categorical": [{"name": "c__k", "cardinality": 5}]}
KERAS = tf.keras.Model.train_step.__module__.split(".")[0]  # "keras" or "tf_keras"


@pytest.fixture
def without_keras_rule(monkeypatch) -> Iterator[None]:
    """AutoGraph's rules as TF 2.16 ships them for tf_keras: none that names Keras' package."""
    kept = tuple(r for r in config.CONVERSION_RULES if not r.matches(f"{KERAS}.src"))
    monkeypatch.setattr(config, "CONVERSION_RULES", kept)
    yield


class _Enough(BaseException):
    """Ends a trace that has shown what it had to (AutoGraph turns an Exception into a fallback)."""


def _rewritten_by_one_step(monkeypatch, keras_enough: int = 0) -> list[str]:
    """``module:qualname`` of every function AutoGraph rewrites while the model is built and ``fit``
    traces its step; with ``keras_enough``, it stops at that many of Keras' own (without the exemption
    they come while the model is built already; all of them take 20 s)."""
    rewritten: list[str] = []
    convert = api._convert_actual

    def spy(entity: Any, program_ctx: Any) -> Any:
        rewritten.append(f"{getattr(entity, '__module__', None) or ''}:{getattr(entity, '__qualname__', '')}")
        if keras_enough and len({m for m in rewritten if m.startswith(f"{KERAS}.")}) >= keras_enough:
            raise _Enough
        return convert(entity, program_ctx)

    monkeypatch.setattr(api, "_convert_actual", spy)
    try:  # building the functional model traces the layers' calls already
        model = build_model(SPEC, TrainingConfig(hidden_units=[4], dropout=0.0, seed=1))
        model.compile(optimizer=tf.keras.optimizers.legacy.Adam(0.01), loss=tf.keras.losses.BinaryCrossentropy())
        x = {"n__x": np.zeros(8, "float32"), "c__k": np.arange(8) % 5}
        model.fit(x, np.ones(8, "float32"), batch_size=8, epochs=1, verbose=0)
    except _Enough:
        pass
    return rewritten


def test_building_the_model_keeps_autograph_out_of_keras(without_keras_rule, monkeypatch):
    assert not conversion.is_allowlisted(tf.keras.Model.train_step)  # the rules TF 2.16 has for tf_keras
    rewritten = _rewritten_by_one_step(monkeypatch)
    assert conversion.is_allowlisted(tf.keras.Model.train_step)
    # Keras' train function is rewritten because tf.function asks for it; nothing Keras' below it is
    keras = {m for m in rewritten if m.startswith(f"{KERAS}.")}
    assert keras == {f"{KERAS}.src.engine.training:Model.make_train_function.<locals>.train_function"}, keras
    assert any(m.startswith("downpour.training.model:") for m in rewritten)  # our layers' calls still are
    assert keras_internals_unconverted()  # idempotent


def test_without_the_rule_autograph_rewrites_keras_and_the_check_sees_it(without_keras_rule, monkeypatch):
    """The companion: the same step with the rule left out (build_model's call to it disabled)."""
    import downpour.training.model as model_module

    monkeypatch.setattr(model_module, "keras_internals_unconverted", lambda: False)
    rewritten = _rewritten_by_one_step(monkeypatch, keras_enough=20)
    assert len({m for m in rewritten if m.startswith(f"{KERAS}.")}) >= 20, rewritten
