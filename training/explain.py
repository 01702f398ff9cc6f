"""Reason codes: integrated gradients of the served score, summed per feature in raw-column terms.

Integrated gradients (Sundararajan et al., 2017) attributes ``F(x) - F(b)`` to the inputs by
integrating the gradient along the straight path from a baseline ``b`` to the row ``x``. Category ids
have no gradient, so the path runs through the model's *representation*: every numeric and flag value,
every categorical's embedding vector and wide weight, every cross's wide weight. The baseline is the
mean representation of a sample of train rows (a typical train row, never validation or test); its
score goes into the model card.

A feature's parts are summed under one name (``feature_groups``): a numeric and its missing flag under
the raw column (``amount``), a window feature under its name (``vel_card_id_count_24h``), a timestamp's
parts as ``ts hour`` / ``ts day of week``, a cross as ``country x ip_country``. Names come from the
feature state (configured feature columns, which are never PII columns; config validation refuses
that), never from values.

Completeness: a row's attributions sum to ``F(x) - F(b)`` up to the error of the trapezoid rule over
the path's points (``scoring.reason_codes.steps``). ``artifact.completeness_gap`` measures it; export
records it on a val batch (model card ``explain.check_gap_16_steps``), and score reports the largest
gap of every batch it explains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


def feature_groups(feature_state: Mapping[str, Any],
                   display: Mapping[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """[(reason name, its shard columns)], in the feature state's order. ``display`` maps the feature
    state's safe column names back to the user's (``Config.names``, inverted)."""
    shown = dict(display or {})

    def name(src: Any) -> str:
        return shown.get(str(src), str(src))

    groups: dict[str, list[str]] = {}
    for entry in [*(feature_state.get("numeric") or []), *(feature_state.get("flags") or [])]:
        groups.setdefault(name(entry["source"]), []).append(str(entry["name"]))
    categorical = {str(c["name"]): c for c in feature_state.get("categorical") or []}
    labels: dict[str, str] = {}
    for c in categorical.values():
        src = name(c["sources"][0])
        labels[str(c["name"])] = {"hour": f"{src} hour", "dow": f"{src} day of week"}.get(c.get("kind"), src)
        groups.setdefault(labels[str(c["name"])], []).append(str(c["name"]))
    for x in feature_state.get("crosses") or []:
        label = " x ".join(labels.get(str(s), str(s).removeprefix("c__")) for s in x["sources"])
        groups.setdefault(label, []).append(str(x["name"]))
    return list(groups.items())


def trapezoid_weights(alphas: tf.Tensor) -> tf.Tensor:
    """Weights of the trapezoid rule over the points ``alphas`` (sorted, from 0 to 1)."""
    gaps = alphas[1:] - alphas[:-1]
    zero = tf.zeros([1], alphas.dtype)
    return (tf.concat([zero, gaps], 0) + tf.concat([gaps, zero], 0)) / 2


class Explainer:
    """The wide & deep model (``training.model``) rewritten as a function of its representation.

    ``logit(represent(cols))`` is the model's logit (export checks it on a batch); the layers are the
    model's own, so the SavedModel's explain signature shares the served weights.
    """

    def __init__(self, model: Any, feature_state: Mapping[str, Any], shift: float,
                 display: Mapping[str, str] | None = None) -> None:
        self.shift = float(shift)
        self.categorical = [(str(c["name"]), int(c.get("embedding_dim") or 0))
                            for c in feature_state.get("categorical") or []]
        self.crosses = [str(x["name"]) for x in feature_state.get("crosses") or []]
        self.dense = [str(n["name"]) for n in feature_state.get("numeric") or []] + \
                     [str(f["name"]) for f in feature_state.get("flags") or []]
        self.emb = model.get_layer("embeddings") if self.categorical else None
        if self.emb is not None:  # the dims the model was built with (build_model's defaults included)
            self.categorical = [(n, int(t.output_dim)) for (n, _), t in zip(self.categorical, self.emb.tables,
                                                                               strict=True)]
        self.wide = model.get_layer("wide")
        self.tower = model.get_layer("deep_tower")
        self.head = model.get_layer("head")
        self.groups = feature_groups(feature_state, display)
        self.columns = [c for _, cols in self.groups for c in cols]

    def represent(self, cols: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """{shard column: [B, k] float32}: its value, or its embedding and wide weight."""
        rep = {n: tf.reshape(tf.cast(cols[n], tf.float32), [-1, 1]) for n in self.dense}
        tables = self.wide.tables
        for i, (name, _) in enumerate(self.categorical):
            rep[name] = tf.concat([self.emb.tables[i](cols[name]), tables[i](cols[name])], axis=-1)
        for j, name in enumerate(self.crosses):
            rep[name] = tables[len(self.categorical) + j](cols[name])
        return rep

    def logit(self, rep: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """[B]: the model's logit plus the prior correction (what the served score is the sigmoid of)."""
        deep_in: list[tf.Tensor] = []
        if self.categorical:
            deep_in.append(tf.concat([rep[n][:, :d] for n, d in self.categorical], axis=-1))
        deep_in += [rep[n] for n in self.dense]
        wide = [rep[n][:, d:] for n, d in self.categorical] + [rep[n] for n in self.crosses]
        if self.dense:
            wide.append(tf.matmul(tf.concat([rep[n] for n in self.dense], axis=-1), self.wide.kernel))
        logit = self.head([self.tower(deep_in, training=False), tf.add_n(wide)])
        return tf.reshape(logit, [-1]) + self.shift

    def baseline(self, batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The mean representation of train rows: {shard column: [1, k]}."""
        reps = [self.represent({c: tf.constant(v) for c, v in b.items()}) for b in batches]
        return {c: np.concatenate([r[c].numpy() for r in reps]).mean(axis=0, keepdims=True).astype(np.float32)
                for c in self.columns}

    def baseline_score(self, baseline: Mapping[str, np.ndarray]) -> float:
        return float(tf.sigmoid(self.logit({c: tf.constant(v) for c, v in baseline.items()}))[0])

    def contributions(self, cols: Mapping[str, tf.Tensor], baseline: Mapping[str, Any],
                      alphas: tf.Tensor) -> tf.Tensor:
        """[B, groups]: each feature's share of score - baseline score (integrated gradients).

        One path point at a time (a loop in the graph), so memory stays that of one batch whatever
        the number of steps."""
        rep = self.represent(cols)
        keys = self.columns
        x = [rep[c] for c in keys]
        b = [tf.cast(baseline[c], tf.float32) for c in keys]
        delta = [xi - bi for xi, bi in zip(x, b, strict=True)]
        weights = trapezoid_weights(tf.cast(alphas, tf.float32))
        total = [tf.zeros_like(xi) for xi in x]
        for i in tf.range(tf.shape(weights)[0]):
            # one point at a time: the steps are independent, and a while loop would otherwise keep
            # up to 10 of them (their activations for the whole batch) in flight
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            a = tf.cast(alphas, tf.float32)[i]
            point = [bi + a * di for bi, di in zip(b, delta, strict=True)]
            with tf.GradientTape() as tape:
                tape.watch(point)
                f = tf.sigmoid(self.logit(dict(zip(keys, point, strict=True))))
            grads = tape.gradient(f, point)
            # a gradient can lose its static shape in the graph (hashed or hour/day lookups): the loop
            # keeps the representation's
            total = [t + weights[i] * tf.ensure_shape(tf.convert_to_tensor(g), t.shape)
                     for t, g in zip(total, grads, strict=True)]
        per_column = {c: tf.reduce_sum(t * d, axis=-1) for c, t, d in zip(keys, total, delta, strict=True)}
        return tf.stack([tf.add_n([per_column[c] for c in cols]) for _, cols in self.groups], axis=-1)
