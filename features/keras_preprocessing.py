"""The FeatureState transformation as Keras layers, so the exported model takes raw columns.

``build_preprocessing(state)`` maps one input per raw column (safe name, serving dtype) to exactly the
tensors ``FeatureState.transform`` writes into the shards: the same float64 arithmetic then a float32
cast for ``n__*``, the same int64 indices for ``c__*`` (vocabulary lookups, FarmHash buckets that
``features.hashing`` reproduces for Spark, UTC hour / day of week from epoch seconds, crosses).

Serving conventions (see DEVELOPERS.md "Serving inputs"): numerics are float64 with NaN for null;
strings use "" for null; integer categories and timestamps (epoch seconds, UTC) are int64 with
``INT64_NULL`` for null. Only this module and its tests import TensorFlow.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from downpour.features.state import CROSS_MULT, CROSS_PRIME, INT64_NULL, TRIM_PATTERN, FeatureState

_DTYPES = {"float64": tf.float64, "int64": tf.int64, "string": tf.string}
_OOV_TOKEN = "\x00downpour-oov\x00"  # never a real (normalized) category


def _ser(cls: type) -> type:
    return tf.keras.utils.register_keras_serializable(package="downpour")(cls)


@_ser
class NumericTransform(tf.keras.layers.Layer):
    """Impute NaN, clip, optional signed log1p, standardize (float64), then float32 (as in Spark)."""

    def __init__(self, impute: float, clip: list[float] | None, transform: str, mean: float, std: float,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.impute, self.clip, self.transform = float(impute), clip, transform
        self.mean, self.std = float(mean), float(std)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, tf.float64)
        x = tf.where(tf.math.is_nan(x), tf.constant(self.impute, tf.float64), x)
        if self.clip is not None:
            lo, hi = (tf.constant(float(b), tf.float64) for b in self.clip)
            x = tf.minimum(tf.maximum(x, lo), hi)
        if self.transform == "log1p":
            x = tf.sign(x) * tf.math.log1p(tf.abs(x))
        x = tf.math.divide(x - tf.constant(self.mean, tf.float64), tf.constant(self.std, tf.float64))
        return tf.cast(x, tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "impute": self.impute, "clip": self.clip, "transform": self.transform,
                "mean": self.mean, "std": self.std}


@_ser
class MissingFlag(tf.keras.layers.Layer):
    """1.0 where the raw numeric is null (NaN at serving), else 0.0."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.math.is_nan(tf.cast(x, tf.float64)), tf.float32)


@_ser
class CategoryString(tf.keras.layers.Layer):
    """A category as the normalized string Spark sees ("" = null): trims / lowercases strings,
    formats integers in decimal (``INT64_NULL`` -> ""); a null becomes ``impute`` when cleaning
    imputes this column."""

    def __init__(self, trim: bool = False, lower: bool = False, impute: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trim, self.lower, self.impute = bool(trim), bool(lower), impute

    def call(self, x: tf.Tensor) -> tf.Tensor:
        if x.dtype != tf.string:
            x = tf.cast(x, tf.int64)
            x = tf.where(x == INT64_NULL, tf.constant(""), tf.strings.as_string(x))
        else:
            if self.trim:
                x = tf.strings.regex_replace(x, TRIM_PATTERN, "")
            if self.lower:
                x = tf.strings.lower(x, encoding="utf-8")
        if self.impute is not None:
            x = tf.where(x == "", tf.constant(self.impute), x)
        return x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "trim": self.trim, "lower": self.lower, "impute": self.impute}


@_ser
class HashBucket(tf.keras.layers.Layer):
    """"" -> 0, else 1 + Fingerprint64 % (buckets - 1): the bucket ``features.hashing`` gives Spark."""

    def __init__(self, buckets: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buckets = int(buckets)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        h = tf.strings.to_hash_bucket_fast(x, self.buckets - 1) + 1
        return tf.where(x == "", tf.zeros_like(h), h)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "buckets": self.buckets}


@_ser
class ConstantIndex(tf.keras.layers.Layer):
    """Index 0 for every row (a vocabulary that came out empty on train)."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.zeros(tf.shape(x), tf.int64)


@_ser
class TimePart(tf.keras.layers.Layer):
    """Epoch seconds (UTC) -> 1 + hour of day, or 1 + day of week (Monday = 1); ``INT64_NULL`` -> 0."""

    def __init__(self, kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind = kind

    def call(self, secs: tf.Tensor) -> tf.Tensor:
        secs = tf.cast(secs, tf.int64)
        if self.kind == "hour":
            idx = tf.math.floordiv(tf.math.floormod(secs, 86_400), 3_600) + 1
        else:
            idx = tf.math.floormod(tf.math.floordiv(secs, 86_400) + 3, 7) + 1
        return tf.where(secs == INT64_NULL, tf.zeros_like(idx), idx)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "kind": self.kind}


@_ser
class CrossIndex(tf.keras.layers.Layer):
    """The index of a cross of categorical indices: exact product, or the hashed form Spark computes."""

    def __init__(self, cardinalities: list[int], kind: str, cardinality: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cardinalities, self.kind, self.cardinality = [int(c) for c in cardinalities], kind, int(cardinality)

    def call(self, xs: list[tf.Tensor]) -> tf.Tensor:
        h = tf.zeros_like(xs[0], tf.int64)
        for x, card in zip(xs, self.cardinalities, strict=True):
            h = h * card + tf.cast(x, tf.int64)
            if self.kind != "exact":
                h = tf.math.floormod(h, CROSS_PRIME)
        if self.kind == "exact":
            return h
        return tf.math.floormod(tf.math.floormod(h * CROSS_MULT, 2**32), self.cardinality)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "cardinalities": self.cardinalities, "kind": self.kind,
                "cardinality": self.cardinality}


def raw_input_signature(state: FeatureState) -> dict[str, tf.TensorSpec]:
    """The exported serving signature: one 1-D tensor per raw column (safe name)."""
    return {n: tf.TensorSpec(shape=(None,), dtype=_DTYPES[t], name=n) for n, t in state.raw_inputs.items()}


def raw_inputs(state: FeatureState) -> dict[str, tf.Tensor]:
    """One ``tf.keras.Input(shape=(), name=<safe raw name>)`` per raw column, in the serving dtypes."""
    return {n: tf.keras.Input(shape=(), name=n, dtype=_DTYPES[t]) for n, t in state.raw_inputs.items()}


def preprocessing_outputs(state: FeatureState, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Apply the transformation to Keras inputs: {shard column: float32 / int64 tensor}."""
    out: dict[str, tf.Tensor] = {}
    flags = {f["source"]: f["name"] for f in state.flags}
    for n in state.numeric:
        x = inputs[n["source"]]
        out[n["name"]] = NumericTransform(n["impute"], n["clip"], n["transform"], n["mean"], n["std"],
                                          name=n["name"])(x)
        if n["source"] in flags:
            out[flags[n["source"]]] = MissingFlag(name=flags[n["source"]])(x)
    strings = state.strings
    for c in state.categorical:
        x, name = inputs[c["sources"][0]], c["name"]
        if c["kind"] in ("hour", "dow"):
            out[name] = TimePart(c["kind"], name=name)(x)
            continue
        s = CategoryString(strings.get("trim", False), strings.get("lower", False), c.get("impute"),
                           name=f"{name}__str")(x)
        if c["kind"] == "hash":
            out[name] = HashBucket(c["buckets"], name=name)(s)
        elif c["vocab"]:
            out[name] = tf.keras.layers.StringLookup(
                vocabulary=c["vocab"], num_oov_indices=1, mask_token=None, oov_token=_OOV_TOKEN, name=name
            )(s)
        else:
            out[name] = ConstantIndex(name=name)(s)
    for c in state.crosses:
        out[c["name"]] = CrossIndex(c["cardinalities"], c["kind"], c["cardinality"], name=c["name"])(
            [out[s] for s in c["sources"]]
        )
    return out


def build_preprocessing(state: FeatureState) -> tf.keras.Model:
    """A Keras model: dict of raw inputs -> dict {shard column name: tensor} (float32 n__*, int64 c__*)."""
    inputs = raw_inputs(state)
    return tf.keras.Model(inputs=inputs, outputs=preprocessing_outputs(state, inputs), name="downpour_preprocessing")
