"""Export the trained model as a SavedModel with two signatures returning ``{"score": [B]}``, and a third
that explains it.

* ``serve_features``: one 1-D input per model-ready shard column (``n__*`` float32, ``c__*`` int64);
  evaluation scores the shards with it.
* ``serving_default``: one 1-D input per *raw* feature column (``feature_state.json``'s
  ``raw_inputs``, safe names, serving dtypes); ``features.keras_preprocessing`` turns them into the
  shard columns inside the graph, so batch scoring and online serving need no Spark.
* ``explain`` (when train rows for a baseline are given): the raw inputs plus the path's points
  (``artifact.EXPLAIN_ALPHAS``); returns ``score`` and ``contributions`` [B, features], the reason
  codes of ``training/explain.py``. Its feature names and baseline score go into the model card.

All apply the prior correction of the imbalance strategy: a model trained on a stream where
negatives were kept with probability ``q`` (or positives weighted ``w``) predicts odds ``1/q``
(``w``) times too high, so the exported score is ``sigmoid(logit(p) + log q)`` (``- log w``), which
brings the mean prediction back to the base rate. The score is computed from the model's logit ``z`` as
``sigmoid(z + shift)``, never by taking the logit of the float32 probability back: that needed a clip
of ``p = sigmoid(z)`` (at 1e-7), which tied most rows of a rare-positive split at one floor value
(ranking, lift and decisions among them lost). The model must be a functional model whose output
layer is the sigmoid named ``score`` (``training.model.build_model``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from downpour.artifact import (
    CONTRIBUTIONS,
    EXPLAIN_ALPHAS,
    EXPLAIN_SIGNATURE,
    FEATURES_SIGNATURE,
    RAW_SIGNATURE,
    completeness_gap,
)
from downpour.config import TrainingConfig
from downpour.logs import LOG


def positive_weight(tcfg: TrainingConfig, positives: int, negatives: int) -> float:
    """The class weight of positives under ``imbalance: class_weight`` (1 otherwise): the configured
    ``positive_weight``, else negatives/positives of the train split ("balanced")."""
    if tcfg.imbalance != "class_weight":
        return 1.0
    if tcfg.positive_weight is not None:
        return float(tcfg.positive_weight)
    return max(1.0, negatives / max(1, positives))


def keep_negatives(tcfg: TrainingConfig) -> float:
    """P(keep) of a negative row in the training stream."""
    return float(tcfg.downsample_negatives) if tcfg.imbalance == "downsample" else 1.0


def logit_shift(tcfg: TrainingConfig, pos_weight: float) -> float:
    """What to add to the trained model's logit so its probabilities match the true base rate."""
    if tcfg.imbalance == "downsample":
        return math.log(keep_negatives(tcfg))
    if tcfg.imbalance == "class_weight":
        return -math.log(pos_weight)
    return 0.0


def served_score(logit: np.ndarray, shift: float) -> np.ndarray:
    """numpy twin of the in-graph score: ``sigmoid(logit + shift)`` in float64, returned as float32."""
    z = np.asarray(logit, dtype=np.float64).reshape(-1) + shift
    return (1 / (1 + np.exp(-z))).astype(np.float32)


def same_scores(got: np.ndarray, want: np.ndarray) -> bool:
    """Scores agree both relative to their size (an absolute tolerance alone accepts any two scores
    below it, where a rare-positive model puts most rows: a floor there is what the export checks must
    catch) and absolutely to 1e-5 (a relative one alone is loose near 1)."""
    got, want = np.asarray(got), np.asarray(want)
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-3, atol=1e-37)) \
        and bool(np.allclose(got, want, rtol=1e-5, atol=1e-5))


def score_gap(got: np.ndarray, want: np.ndarray) -> str:
    """The largest absolute and relative differences, for an export check's error message."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return f"shapes {got.shape} and {want.shape}"
    diff = np.abs(got - want)
    rel = diff / np.maximum(np.abs(want), 1e-37)
    return f"max abs diff {diff.max(initial=0.0):.3g}, max relative diff {rel.max(initial=0.0):.3g}"


def export_saved_model(model: Any, feature_state: Mapping[str, Any], shift: float, path: str,
                       check_batch: Mapping[str, np.ndarray] | None = None,
                       baseline_batches: Sequence[Mapping[str, np.ndarray]] = (),
                       display_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write ``path`` (a local directory); returns ``{"signatures": {signature: input names},
    "explain": {"features", "baseline_score", "baseline_rows"} or None}``.

    With ``check_batch`` (shard columns), the SavedModel is loaded back and its ``serve_features``
    scores are compared with the in-memory model's, so a broken export fails here, not in scoring;
    with ``baseline_batches`` too, the explain path must reproduce those scores and its attributions
    must be complete. ``baseline_batches`` are train rows (shard columns): the reason codes' baseline;
    ``display_names`` (safe -> the user's column names) name the reasons.
    """
    import tensorflow as tf

    from downpour.training.model import input_columns, logit_model

    columns = input_columns(feature_state)
    shift_t = float(shift)
    logits = logit_model(model)

    class Scorer(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="downpour_scorer")
            self.weights = _state_of(model)
            self.preprocessing: list[Any] = []

        def score(self, cols: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            z = tf.reshape(tf.cast(logits({c: cols[c] for c in columns}, training=False), tf.float32), [-1])
            return {"score": tf.sigmoid(z + shift_t)}

    scorer = Scorer()

    @tf.function
    def serve_features(**cols: tf.Tensor) -> dict[str, tf.Tensor]:
        return scorer.score(cols)

    specs = {c: tf.TensorSpec([None], dt, name=c) for c, dt in columns.items()}
    signatures = {FEATURES_SIGNATURE: serve_features.get_concrete_function(**specs)}
    inputs = {FEATURES_SIGNATURE: list(specs)}

    explainer, baseline, explain = None, None, None
    if baseline_batches:
        from downpour.training.explain import Explainer

        explainer = Explainer(model, feature_state, shift_t, display_names)
        baseline = explainer.baseline(baseline_batches)
        explain = {"features": [name for name, _ in explainer.groups],
                   "baseline_score": explainer.baseline_score(baseline),
                   "baseline_rows": int(sum(len(next(iter(b.values()))) for b in baseline_batches))}
    raw = _raw_signature(scorer, feature_state, explainer, baseline)
    if raw is not None:
        for name, (fn, names) in raw.items():
            signatures[name], inputs[name] = fn, names
    else:
        LOG.warning("export: features.keras_preprocessing is unavailable; exporting %s only",
                    FEATURES_SIGNATURE)
        explain = None
    tf.saved_model.save(scorer, path, signatures=signatures)
    if check_batch is not None:
        loaded = tf.saved_model.load(path)  # once, for every check below
        batch = {c: check_batch[c] for c in columns}
        want = served_score(_logits(logits, batch), shift_t)  # the trained model's scores, once
        _check(loaded, batch, want)
        if explainer is not None and baseline is not None and explain is not None:
            explain["check_gap_16_steps"] = _check_explainer(explainer, baseline, explain["baseline_score"],
                                                             batch, want)
            _check_explain_signature(loaded, len(explain["features"]))
    return {"signatures": inputs, "explain": explain}


def _raw_signature(scorer: Any, feature_state: Mapping[str, Any], explainer: Any = None,
                   baseline: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple[Any, list[str]]] | None:
    import tensorflow as tf

    try:
        from downpour.features.keras_preprocessing import build_preprocessing, raw_input_signature
        from downpour.features.state import FeatureState
    except ImportError:
        return None
    state = FeatureState.from_dict(dict(feature_state))
    preprocessing = build_preprocessing(state)
    scorer.preprocessing = _state_of(preprocessing)
    raw_specs = raw_input_signature(state)

    @tf.function
    def serving_default(**raw: tf.Tensor) -> dict[str, tf.Tensor]:
        return scorer.score(preprocessing(raw))

    out = {RAW_SIGNATURE: (serving_default.get_concrete_function(**raw_specs), list(raw_specs))}
    if explainer is None or baseline is None:
        return out
    base = {c: tf.constant(v) for c, v in baseline.items()}

    @tf.function
    def explain(**raw: tf.Tensor) -> dict[str, tf.Tensor]:
        alphas = raw.pop(EXPLAIN_ALPHAS)
        cols = preprocessing(raw)
        return {**scorer.score(cols), CONTRIBUTIONS: explainer.contributions(cols, base, alphas)}

    specs = {**raw_specs, EXPLAIN_ALPHAS: tf.TensorSpec([None], tf.float32, name=EXPLAIN_ALPHAS)}
    out[EXPLAIN_SIGNATURE] = (explain.get_concrete_function(**specs), list(specs))
    return out


def _state_of(keras_model: Any) -> list[Any]:
    """What a signature that calls ``keras_model`` captures: its variables and lookup tables.

    The scorer tracks these rather than the Keras model itself: tracking a Keras object makes
    ``tf.saved_model.save`` trace every layer's call for Keras' own loader, which lengthens every
    export (and nothing loads the Keras objects back: serving uses the two signatures). A
    captured object that is missed here is not silently dropped: saving refuses an untracked resource.
    """
    tables = [layer.lookup_table for layer in keras_model.submodules  # nested layers included
              if getattr(layer, "lookup_table", None) is not None]
    return [*keras_model.variables, *tables]


def _check_explainer(explainer: Any, baseline: Mapping[str, np.ndarray], baseline_score: float,
                     batch: dict[str, np.ndarray], want: np.ndarray, steps: int = 16) -> float:
    """The explain path must compute the served scores (else the export fails); returns the largest
    completeness gap on the batch at ``steps`` (scoring's default), which goes into the model card."""
    import tensorflow as tf

    cols = {k: tf.constant(v) for k, v in batch.items()}
    got = tf.sigmoid(explainer.logit(explainer.represent(cols))).numpy()
    if not same_scores(got, want):
        raise RuntimeError(f"export check failed: the explain path's scores differ from the model's "
                           f"({score_gap(got, want)}); training/explain.py is out "
                           "of step with training/model.py")
    alphas = tf.linspace(0.0, 1.0, steps + 1)
    gap = completeness_gap(explainer.contributions(cols, baseline, alphas).numpy(), got, baseline_score)
    return round(float(gap.max()), 6)


def _check_explain_signature(loaded: Any, features: int) -> None:
    """The saved ``explain`` signature serves what ``serving_default`` serves, with one finite
    contribution per named feature (a few made-up raw rows of every dtype)."""
    import tensorflow as tf

    served, explain = loaded.signatures[RAW_SIGNATURE], loaded.signatures[EXPLAIN_SIGNATURE]
    _, specs = served.structured_input_signature
    made_up = {"string": [b"", b"a", b"b", b"zz"], "float": [0.0, 1.0, -2.5, 100.0]}
    rows = {k: tf.constant(made_up["string"] if v.dtype == tf.string else made_up["float"] if v.dtype.is_floating
                           else [0, 1, 2, 3], dtype=v.dtype) for k, v in specs.items()}
    want = served(**rows)["score"].numpy()
    got = explain(**rows, **{EXPLAIN_ALPHAS: tf.linspace(0.0, 1.0, 17)})
    contributions = got[CONTRIBUTIONS].numpy()
    if not same_scores(got["score"].numpy(), want):
        raise RuntimeError("export check failed: the explain signature's scores differ from serving_default's")
    if contributions.shape != (len(want), features) or not np.isfinite(contributions).all():
        raise RuntimeError(f"export check failed: explain returned contributions of shape {contributions.shape} "
                           f"for {features} named features, or non-finite ones")


def _logits(logits: Any, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The model's logits of ``batch`` (``logits``: ``training.model.logit_model`` of it) as a flat array."""
    return np.asarray(logits(dict(batch), training=False)).reshape(-1)


def _check(loaded: Any, batch: dict[str, np.ndarray], want: np.ndarray) -> None:
    import tensorflow as tf

    got = loaded.signatures[FEATURES_SIGNATURE](**{k: tf.constant(v) for k, v in batch.items()})["score"].numpy()
    if not same_scores(got, want):
        raise RuntimeError(f"export check failed: the SavedModel scores differ from the trained model's "
                           f"({score_gap(got, want)})")
