"""The MLflow Model Registry: what the quality gate's decision does to the registered model.

A model the gate promotes becomes a version of the registered model with the alias ``champion`` and a
signature of the raw columns in, ``score`` out (an MLflow model that pyfunc serves); a refused model is
a version too, with the alias ``challenger``, and the champion stays; a second promotion moves the
champion. Against MLflow's own file store, which keeps aliases in the installed 2.x (no sqlite needed),
with SavedModels from the real export (``training/export.py``: ``serve_features`` for the evaluation,
``serving_default`` on raw columns) of two known models of ``benchmarks.synthetic``'s data: its true
logistic model and a scrambled one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from benchmarks import synthetic
from downpour import tracking
from downpour.config import config_from_dict, load_config
from downpour.errors import ConfigError, GateRefused

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUMERIC, CATEGORICAL, CARD = 3, 2, 6
# the serving_default inputs of an export of synthetic's feature state: its raw columns, in the card's order
RAW_COLUMNS = {"x0": "double", "x1": "double", "x2": "double", "k0": "string", "k1": "string"}


def _export(state: dict[str, Any], w: np.ndarray, tables: list[np.ndarray], path: Path) -> dict[str, Any]:
    """The real export of sigmoid(w.x + table[k]) as a Keras model: returns the export's signatures."""
    import tensorflow as tf

    from downpour.training.export import export_saved_model

    class Linear(tf.keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(w, dtype=tf.float64)
            self.tables = [tf.Variable(t, dtype=tf.float64) for t in tables]

        def call(self, inputs):
            z = tf.add_n([tf.cast(inputs[f"n__x{i}"], tf.float64) * self.w[i] for i in range(NUMERIC)])
            for j, t in enumerate(self.tables):
                z += tf.gather(t, inputs[f"c__k{j}"])
            return tf.cast(z, tf.float32)

    # a functional model whose last layer is the sigmoid named "score", as training/model.py builds it
    inputs = {f"n__x{i}": tf.keras.Input(shape=(), name=f"n__x{i}", dtype=tf.float32) for i in range(NUMERIC)}
    inputs |= {f"c__k{j}": tf.keras.Input(shape=(), name=f"c__k{j}", dtype=tf.int64) for j in range(CATEGORICAL)}
    score = tf.keras.layers.Activation("sigmoid", name="score")(Linear()(inputs))
    model = tf.keras.Model(inputs=inputs, outputs=score)
    return export_saved_model(model, state, 0.0, str(path))["signatures"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Any]:
    """A synthetic prepared/ and two exported SavedModels of its data: the true model and a scrambled one."""
    root = tmp_path_factory.mktemp("registry")
    manifest = synthetic.write_prepared(str(root / "run"), {"train": 600, "val": 1000, "test": 1500},
                                        row_group_rows=200, numeric=NUMERIC, categorical=CATEGORICAL,
                                        cardinality=CARD, positive_rate=0.25)
    state = synthetic.feature_state(NUMERIC, CATEGORICAL, CARD)
    coef = np.random.default_rng(12345)  # the coefficients synthetic draws its labels from, in its order
    w = np.array([coef.normal(0, 1.0) for _ in range(NUMERIC)])
    tables = [coef.normal(0, 1.0, CARD) for _ in range(CATEGORICAL)]
    rng = np.random.default_rng(0)
    models = {"good": (w, tables), "scrambled": (rng.normal(size=NUMERIC), [rng.normal(size=CARD) for _ in tables])}
    signatures = {kind: _export(state, *coefs, root / "models" / kind) for kind, coefs in models.items()}
    return {"root": root, "data_version": manifest["data_version"], "signatures": signatures}


def _place(exported: dict[str, Any], out: Path, kind: str, version: str, gate: dict[str, Any] | None = None) -> None:
    """``<out>/model``: the ``kind`` SavedModel under model ``version``, its card as train writes the
    fields tracking reads (with ``gate``: as evaluate --gate leaves it)."""
    import tensorflow as tf

    model = out / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(exported["root"] / "models" / kind, model / "saved_model")
    card = {"name": "synthetic", "model_version": version, "data_version": exported["data_version"],
            "training": {"workers": 1, "epochs_completed": 1}, "signatures": exported["signatures"][kind],
            "frameworks": {"python": "3.11", "tensorflow": tf.__version__}}
    if gate is not None:
        card["evaluation"] = {"gate": gate}
        card["metrics"] = {"test": {"roc_auc": gate.get("value")}}
    (model / "model_card.json").write_text(json.dumps(card))


def _gate(promoted: bool, value: float = 0.8) -> dict[str, Any]:
    return {"promoted": promoted, "metric": "roc_auc", "value": value,
            "reason": "promoted: no champion yet" if promoted else "refused: worse than the champion"}


def _cfg(out: Path, *overrides: str):
    return config_from_dict({
        "name": "synthetic", "input": {"path": str(out / "raw.csv")},
        "schema": {"id": "string", "x0": "double", "k0": "string", "y": "int"},
        "id_column": "id", "label": {"column": "y", "positive": 1},
        "features": {"numeric": ["x0"], "categorical": ["k0"]},
        "output": {"path": str(out)},
        "evaluation": {"precision_at_k": [10], "fpr_points": [0.1], "registry": str(out / "registry"),
                       "baseline": False},
        "tracking": {"mlflow_uri": (out / "mlruns").as_uri()},
    }, list(overrides))


# ---- the checks ------------------------------------------------------------------------------------------
def assert_aliases(client: MlflowClient, name: str, champion: str | None, challenger: str | None) -> None:
    """Each alias of the registered model is on the version of that Downpour model version (None: no alias)."""
    aliases = client.get_registered_model(name).aliases
    for alias, want in (("champion", champion), ("challenger", challenger)):
        got = (client.get_model_version_by_alias(name, alias).tags.get(tracking.TAG_VERSION)
               if alias in aliases else None)
        assert got == want, f"alias {alias} of {name} is on model {got}, expected {want}"


def assert_raw_signature(uri: str) -> None:
    """The registered model's signature: the raw columns (serving_default) in, score out."""
    sig = mlflow.models.get_model_info(uri).signature
    assert sig is not None, f"{uri} has no signature"
    assert {c.name: c.type.name for c in sig.inputs.inputs} == RAW_COLUMNS
    assert [c.name for c in sig.outputs.inputs] == ["score"]


def _version_of(client: MlflowClient, name: str, model_version: str):
    found = [mv for mv in client.search_model_versions(f"name='{name}'")
             if mv.tags.get(tracking.TAG_VERSION) == model_version]
    assert len(found) == 1, f"{len(found)} registered versions of model {model_version}"
    return found[0]


# ---- the gate through evaluate: promote, refuse, promote again -------------------------------------------
@pytest.mark.slow  # three evaluations in Spark (about 2 minutes); the tests below check the same without Spark
def test_gate_moves_champion_and_challenger_aliases_with_a_raw_signature(spark, exported, tmp_path):
    from downpour import api

    out = tmp_path / "out"
    shutil.copytree(exported["root"] / "run", out, symlinks=True)
    cfg = _cfg(out)
    name = "downpour-synthetic"
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)

    _place(exported, out, "good", "m-good")
    assert api.evaluate(cfg, spark=spark, gate=True)["gate"]["promoted"]
    assert_aliases(client, name, champion="m-good", challenger=None)
    first = _version_of(client, name, "m-good")
    assert first.tags["downpour.gate"] == "promoted" and "promoted" in first.description
    assert first.tags["downpour.gate_metric"] == "roc_auc"
    assert_raw_signature(f"models:/{name}@champion")

    # the registered champion is an MLflow model that serves the exported serving_default on raw rows
    import tensorflow as tf

    rows = pd.DataFrame({"x0": [0.5, -1.0, 2.0], "x1": [0.0, 1.5, -0.3], "x2": [1.0, 0.2, -2.0],
                         "k0": ["v0", "v3", "unseen"], "k1": ["v1", "v4", "v2"]})
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(rows)
    direct = tf.saved_model.load(str(out / "model" / "saved_model")).signatures["serving_default"](
        **{c: tf.constant(rows[c].to_numpy()) for c in rows})["score"].numpy()
    np.testing.assert_allclose(served["score"].to_numpy(), direct, rtol=1e-6)

    _place(exported, out, "scrambled", "m-scrambled")
    with pytest.raises(GateRefused):
        api.evaluate(cfg, spark=spark, gate=True)
    assert_aliases(client, name, champion="m-good", challenger="m-scrambled")
    refused = _version_of(client, name, "m-scrambled")
    assert refused.tags["downpour.gate"] == "refused" and "m-scrambled" in refused.description
    assert_raw_signature(f"models:/{name}@challenger")

    _place(exported, out, "good", "m-good-2")  # the same figures as the champion: within the tolerance
    assert api.evaluate(cfg, spark=spark, gate=True)["gate"]["promoted"]
    assert_aliases(client, name, champion="m-good-2", challenger="m-scrambled")
    assert int(_version_of(client, name, "m-good-2").version) == 3
    # every evaluation logged its run: three runs, three versions, each version from its run's model/
    runs = client.search_runs([client.get_experiment_by_name("downpour-synthetic").experiment_id])
    assert len(runs) == 3
    assert {mv.run_id for mv in client.search_model_versions(f"name='{name}'")} == {r.info.run_id for r in runs}


# ---- the same decisions from the model card alone (no Spark) ---------------------------------------------
def test_a_second_promotion_moves_the_champion_and_the_check_fails_when_the_alias_is_not_moved(
        exported, tmp_path, monkeypatch):
    """The companion: the same promotion with the alias step skipped (``move_aliases`` a no-op) leaves
    the champion on the old version, and ``assert_aliases`` catches it."""
    out = tmp_path / "out"
    cfg = _cfg(out)
    name = tracking.registered_model_name(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)

    _place(exported, out, "good", "m-a", _gate(True))
    assert tracking.log_evaluation(cfg)
    assert_aliases(client, name, champion="m-a", challenger=None)

    _place(exported, out, "scrambled", "m-b", _gate(False, 0.5))
    tracking.log_evaluation(cfg)
    assert_aliases(client, name, champion="m-a", challenger="m-b")

    _place(exported, out, "good", "m-c", _gate(True))
    monkeypatch.setattr(tracking, "move_aliases", lambda *a, **k: None)  # the mechanism, broken
    tracking.log_evaluation(cfg)
    _version_of(client, name, "m-c")  # registered all the same
    with pytest.raises(AssertionError, match="alias champion of downpour-synthetic is on model m-a"):
        assert_aliases(client, name, champion="m-c", challenger="m-b")
    monkeypatch.undo()

    tracking.log_evaluation(cfg)  # evaluating the same model again: its version, now with the aliases moved
    assert_aliases(client, name, champion="m-c", challenger="m-b")
    assert len(client.search_model_versions(f"name='{name}'")) == 3


def test_promoting_the_challenger_takes_its_challenger_alias_off(exported, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(out)
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    _place(exported, out, "good", "m-a", _gate(False))
    tracking.log_evaluation(cfg)
    assert_aliases(client, "downpour-synthetic", champion=None, challenger="m-a")
    _place(exported, out, "good", "m-a", _gate(True))  # re-evaluated, now promoted
    tracking.log_evaluation(cfg)
    assert_aliases(client, "downpour-synthetic", champion="m-a", challenger=None)
    assert _version_of(client, "downpour-synthetic", "m-a").tags["downpour.gate"] == "promoted"


def test_unity_catalog_name_and_switching_registration_off(exported, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(out, "tracking.registered_model=main.ml_models.churn-v2")
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    _place(exported, out, "good", "m-a", _gate(True))
    tracking.log_evaluation(cfg)
    assert_aliases(client, "main.ml_models.churn-v2", champion="m-a", challenger=None)
    assert_raw_signature("models:/main.ml_models.churn-v2@champion")

    off = _cfg(tmp_path / "off", "tracking.register_model=false")
    _place(exported, tmp_path / "off", "good", "m-a", _gate(True))
    run_id = tracking.log_evaluation(off)
    off_client = MlflowClient(tracking_uri=off.tracking.mlflow_uri)
    assert off_client.search_registered_models() == []
    assert_raw_signature(f"runs:/{run_id}/model")  # still an MLflow model in its run

    ungated = _cfg(tmp_path / "ungated")
    _place(exported, tmp_path / "ungated", "good", "m-a")  # evaluate without --gate: nothing to decide
    assert tracking.log_evaluation(ungated)
    assert MlflowClient(tracking_uri=ungated.tracking.mlflow_uri).search_registered_models() == []


def test_registry_uri_sends_unity_catalog_names_to_databricks_uc(tmp_path):
    def cfg(uri: str, *extra: str):
        return load_config(ROOT / "conf" / "crm_telco.yaml",
                           [f"output.path={tmp_path}", f"tracking.mlflow_uri={uri}", *extra])

    assert tracking.registered_model_name(cfg("databricks")) == "downpour-crm_telco"
    assert tracking.registry_uri(cfg("databricks")) == "databricks"
    assert tracking.registry_uri(cfg("databricks", "tracking.registered_model=main.ml.churn")) == "databricks-uc"
    assert tracking.registry_uri(cfg("databricks://prod", "tracking.registered_model=main.ml.churn")) == \
        "databricks-uc://prod"
    assert tracking.registry_uri(cfg("http://mlflow:5000", "tracking.registered_model=main.ml.churn")) == \
        "http://mlflow:5000"


@pytest.mark.parametrize("value", ["main.ml", "main..churn", ".ml.churn", "main.ml.churn.v2", "main.ml.",
                                   "a/b", "", "churn model", "models:/x"])
def test_a_broken_registered_model_name_stops_the_run_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match="tracking.registered_model"):
        load_config(ROOT / "conf" / "crm_telco.yaml",
                    [f"output.path={tmp_path}", f"tracking.registered_model={value!r}"])


def test_registration_needs_the_logged_model(tmp_path):
    conf = ROOT / "conf" / "crm_telco.yaml"
    with pytest.raises(ConfigError, match="tracking.register_model: .*tracking.log_model"):
        load_config(conf, [f"output.path={tmp_path}", "tracking.log_model=false", "tracking.register_model=true"])
    # log_model: false alone simply leaves the registry alone too
    assert load_config(conf, [f"output.path={tmp_path}", "tracking.log_model=false"]).tracking.register_model
    for good in ("downpour-churn", "churn_v2", "main.ml.churn", "Main.ML_2.churn-v2"):
        assert load_config(conf, [f"output.path={tmp_path}", f"tracking.registered_model={good}"])
