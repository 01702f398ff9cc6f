"""The exported score keeps the model's order everywhere: it is ``sigmoid(logit + prior correction)``
computed from the logit. A float32 probability clipped before the correction tied every confident
negative at one floor value (about 94 % of a fraud val split), which cost ROC-AUC whenever a positive
fell among them, and left lift and decisions nothing to rank."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from benchmarks import synthetic
from downpour.artifact import FEATURES_SIGNATURE
from downpour.config import TrainingConfig
from downpour.training.export import export_saved_model, served_score
from downpour.training.model import build_model, logit_model

STATE = synthetic.feature_state(numeric=1, categorical=1, cardinality=5, crosses=False)
SHIFT = float(np.log(0.1))  # training.downsample_negatives: 0.1


def _confident_model() -> tf.keras.Model:
    """The real wide & deep model, its logits between about -45 and -15: confident negatives."""
    model = build_model(STATE, TrainingConfig(hidden_units=[4], dropout=0.0, seed=3))
    for v in model.weights:
        v.assign(np.zeros(v.shape, dtype="float32"))
    wide = model.get_layer("wide")
    wide.kernel.assign(np.full(wide.kernel.shape, 10.0, dtype="float32"))
    model.get_layer("head").logit.bias.assign([-30.0])
    return model


def test_served_scores_keep_the_order_of_very_negative_logits(tmp_path):
    model = _confident_model()
    rows = {"n__x0": np.linspace(-1.5, 1.5, 50).astype("float32"), "c__k0": np.arange(50) % 5}
    logits = np.asarray(logit_model(model)(rows, training=False)).reshape(-1)
    assert logits.min() < -40 and logits.max() <= -15, logits  # sigmoid of all of them is below 1e-6
    export_saved_model(model, STATE, SHIFT, str(tmp_path / "m"))
    served = tf.saved_model.load(str(tmp_path / "m")).signatures[FEATURES_SIGNATURE](
        **{k: tf.constant(v) for k, v in rows.items()})["score"].numpy()
    np.testing.assert_allclose(served, served_score(logits, SHIFT), rtol=1e-4)
    assert len(np.unique(served)) == len(rows["n__x0"])  # no ties: 50 distinct logits, 50 scores
    assert (np.diff(served) > 0).all()  # the logits increase along the rows, and so do the scores
