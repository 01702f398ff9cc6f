"""MLflow tracking of an evaluated model: params, metrics, the report and the model (optional extra).

Enabled by ``tracking.mlflow_uri`` in the config (``file:///mlruns``, ``http://mlflow:5000``,
``databricks``); install with ``pip install 'downpour[mlflow]'``. Nothing here runs without it.

``api.evaluate`` calls :func:`log_evaluation` after every evaluation, promoted or refused by the gate,
so the MLflow run shows exactly what the model card says. Everything is read back from the outputs
(model card, ``history.json``, ``report/``, the SavedModel), so what MLflow holds is what was
published, and no PII can reach it that did not already reach those (none does: see the contract).
One MLflow run per model version: evaluating the same model again updates its run.

The run gets:
* params: the training settings (``training.*``, from ``Config.to_public_dict``: an interpolated value
  is its ``${VAR}`` template), ``name``, ``data_version``, ``model_version`` and the config fingerprint;
* metrics: ``<split>_<metric>`` and ``baseline_<split>_<metric>`` from the model card, and the
  per-epoch training curves (``train_<metric>``, step = epoch) from ``history.json``;
* tags: ``downpour.model_version``, ``downpour.data_version``, ``downpour.gate`` (promoted / refused /
  not_gated) and the gate's reason;
* artifacts: ``model_card.json``, ``history.json``, ``report/`` and the SavedModel as
  ``model/saved_model`` (``tracking.log_model: false`` leaves the model out), with ``model/MLmodel``
  beside it: ``model/`` is an MLflow model (pyfunc through ``mlflow.tensorflow``) whose signature is
  the ``serving_default`` one, raw columns in, ``score`` out.

The Model Registry (``tracking.register_model``, on by default; evaluations with the gate only): the
run's ``model/`` becomes a version of ``tracking.registered_model`` (default ``downpour-<name>``; a
Unity Catalog ``catalog.schema.model`` goes to ``databricks-uc`` when the tracking URI is Databricks),
one version per model version, tagged with the gate's decision. A promoted model takes the alias
``champion`` (while it is still the local registry's champion: a later promotion that overtook it
keeps the alias), a refused one ``challenger``; the champion stays where it was.

Why an ``MLmodel`` written beside the logged SavedModel rather than ``mlflow.tensorflow.log_model``:
that flavor saves a live Keras model or ``tf.Module`` again (loading ours in the driver, and writing
another copy of it) and serves a module by calling it, which the exported scorer does not support;
MLflow's loader for a SavedModel with a named signature def (``model_type: tf1-estimator``, any TF2
SavedModel despite the name) serves the very files that ``score`` uses, by the signature that takes
raw columns. The signature is read from ``saved_model.pb`` (no variables loaded).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from downpour.config import Config, is_unity_catalog_name
from downpour.errors import ConfigError
from downpour.logs import LOG, timed

TAG_VERSION = "downpour.model_version"
_MAX_PARAM = 500  # MLflow's historic limit on a param value
MODEL_PATH = "model"  # the run's MLflow model: MLmodel beside saved_model/
CHAMPION, CHALLENGER = "champion", "challenger"  # the registered model's aliases
# TensorFlow dtype names of the serving signature's inputs -> MLflow column types
_COLUMN_TYPES = {"float64": "double", "float32": "float", "int64": "long", "int32": "integer",
                 "string": "string", "bool": "boolean"}


def enabled(cfg: Config) -> bool:
    return bool(cfg.tracking.mlflow_uri)


def check(cfg: Config) -> None:
    """Fail before any work when tracking is configured but MLflow is not installed (exit code 2)."""
    if not enabled(cfg):
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("tracking.mlflow_uri: is set but MLflow is not installed; "
                          "pip install 'downpour[mlflow]' (or unset tracking.mlflow_uri)") from None


def _flatten(prefix: str, obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(f"{prefix}.{k}" if prefix else str(k), v)
    else:
        yield prefix, obj


def params_of(cfg: Config, card: Mapping[str, Any]) -> dict[str, str]:
    """Training settings and identities as MLflow params (strings, bounded length), from the public
    view of the config: params are immutable and widely readable, so no secret may reach them."""
    params = {k: v for k, v in _flatten("training", cfg.to_public_dict()["training"])}
    params.update({"name": cfg.name, "data_version": card.get("data_version"),
                   "model_version": card.get("model_version"), "config_fingerprint": cfg.fingerprint()})
    return cfg.scrub({k: str(v)[:_MAX_PARAM] for k, v in params.items()})


def public_uri(cfg: Config) -> str:
    """The tracking URI as logs may show it: its template, no token or password (``https://u:${T}@h``)."""
    return str(cfg.to_public_dict()["tracking"]["mlflow_uri"])


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def metrics_of(card: Mapping[str, Any]) -> dict[str, float]:
    """``val_roc_auc``, ``test_pr_auc``, ``baseline_test_roc_auc``, ``baseline_gbt_test_roc_auc``, ...
    from the model card (numbers only)."""
    out: dict[str, float] = {}
    for prefix, block in (("", card.get("metrics")), ("baseline_", card.get("baseline")),
                          ("baseline_gbt_", card.get("baseline_gbt"))):
        for split, values in (block or {}).items():
            for name, v in (values or {}).items():
                if _finite(v):
                    out[f"{prefix}{split}_{name}".replace("@", "_at_")] = float(v)
    return out


def curves_of(history: Mapping[str, Any] | None) -> list[tuple[str, float, int]]:
    """(metric, value, epoch) for every number of every epoch in training's ``history.json``."""
    rows: list[tuple[str, float, int]] = []
    for i, epoch in enumerate((history or {}).get("epochs") or []):
        step = int(epoch.get("epoch", i)) if _finite(epoch.get("epoch")) else i
        for name, v in epoch.items():
            if name != "epoch" and _finite(v):
                rows.append((f"train_{name}", float(v), step))
    return rows


def _gate_tags(card: Mapping[str, Any]) -> dict[str, str]:
    gate = (card.get("evaluation") or {}).get("gate")
    if not gate:
        return {"downpour.gate": "not_gated"}
    return {"downpour.gate": "promoted" if gate.get("promoted") else "refused",
            "downpour.gate_reason": str(gate.get("reason", ""))[:5000]}


def _local_copy(url: str, tmp: str) -> str | None:
    """A local directory holding ``url`` (downloaded when remote), or None if it does not exist."""
    from downpour import storage

    if not storage.exists(url):
        return None
    if storage.is_local(url):
        return storage.local_path(url)
    return storage.download_dir(url, os.path.join(tmp, os.path.basename(url.rstrip("/"))))


def log_evaluation(cfg: Config) -> str | None:
    """Log the evaluated model under ``cfg.output.path`` to MLflow; returns the run id (None if disabled).

    A tracking server that cannot be reached does not fail the pipeline (the model is already
    evaluated and, with the gate, promoted): it is logged as an error and None is returned.
    """
    if not enabled(cfg):
        return None
    check(cfg)
    import mlflow

    from downpour import storage
    from downpour.artifact import CARD, HISTORY, ModelArtifact
    from downpour.layout import RunLayout

    layout = RunLayout(cfg.output.path)
    artifact = ModelArtifact.at(layout.model)
    if not storage.exists(artifact.card_url):
        LOG.warning("tracking: %s is missing; nothing to log to MLflow", artifact.card_url)
        return None
    card = storage.read_json(artifact.card_url)
    history = artifact.history()
    saved_model = artifact.saved_model
    card, history = cfg.scrub(card), cfg.scrub(history)  # written before this config? scrub again
    version = str(card.get("model_version"))
    where = public_uri(cfg)
    tmp = tempfile.mkdtemp(prefix="downpour-mlflow-")
    try:
        with timed(f"tracking: MLflow run of model {version} at {where}"):
            mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
            experiment = mlflow.set_experiment(cfg.tracking.experiment or f"downpour-{cfg.name}")
            found = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_VERSION}` = '{version}'",
                                       max_results=1, output_format="list")
            run_id = found[0].info.run_id if found else None
            with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{cfg.name}-{version}") as run:
                mlflow.set_tags({TAG_VERSION: version, "downpour.data_version": str(card.get("data_version")),
                                 "downpour.name": cfg.name, **_gate_tags(card)})
                if run_id is None:  # params are immutable in MLflow: set once per model version
                    mlflow.log_params(params_of(cfg, card))
                mlflow.log_metrics(metrics_of(card))
                for name, value, step in curves_of(history):
                    mlflow.log_metric(name, value, step=step)
                mlflow.log_dict(card, CARD)
                if history is not None:
                    mlflow.log_dict(history, HISTORY)
                report = _local_copy(layout.report, tmp)
                if report:
                    mlflow.log_artifacts(report, "report")
                model = _local_copy(saved_model, tmp) if cfg.tracking.log_model else None
                if model:
                    mlflow.log_artifacts(model, f"{MODEL_PATH}/saved_model")
            LOG.info("tracking: model %s logged to MLflow run %s (experiment %s)", version, run.info.run_id,
                     experiment.name)
        if model:
            publish_model(cfg, run.info.run_id, run.info.artifact_uri, card, model, tmp)
        return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - tracking must not undo a finished evaluation
        LOG.error("tracking: could not log model %s to MLflow at %s: %s: %s", version, where,
                  exc.__class__.__name__, cfg.scrub(str(exc)))
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the MLflow model and the Model Registry ---------------------------------------------------------
def registered_model_name(cfg: Config) -> str:
    """``tracking.registered_model``, else ``downpour-<name>`` (a dot of the name as ``-``: a plain name)."""
    return cfg.tracking.registered_model or f"downpour-{cfg.name.replace('.', '-')}"


def registry_uri(cfg: Config) -> str:
    """Where the model is registered: the tracking server's registry, except that a Unity Catalog name
    with a Databricks tracking URI (``databricks``, ``databricks://<profile>``) goes to ``databricks-uc``."""
    uri = str(cfg.tracking.mlflow_uri)
    if is_unity_catalog_name(registered_model_name(cfg)) and (uri == "databricks" or uri.startswith("databricks://")):
        return "databricks-uc" + uri[len("databricks"):]
    return uri


def serving_signature(saved_model_dir: str, order: Sequence[str] = ()) -> Any | None:
    """The MLflow ``ModelSignature`` of the SavedModel's ``serving_default``: one column per raw input
    (its type from the graph), ``score`` out. Read from ``saved_model.pb`` alone, no variables loaded.
    Columns in ``order`` (the card's ``signatures.serving_default``) where it names them all, else sorted.
    None when the SavedModel has no such signature (an export without the raw-column signature)."""
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from tensorflow.core.protobuf import saved_model_pb2

    from downpour.artifact import RAW_SIGNATURE

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    for graph in proto.meta_graphs:
        if "serve" in graph.meta_info_def.tags and RAW_SIGNATURE in graph.signature_def:
            sig = graph.signature_def[RAW_SIGNATURE]
            break
    else:
        return None

    def columns(tensors: Mapping[str, Any], names: Sequence[str]) -> Any:
        cols = []
        for name in names:
            dtype = tf.dtypes.as_dtype(tensors[name].dtype).name
            if dtype not in _COLUMN_TYPES:
                raise ValueError(f"{RAW_SIGNATURE} input {name!r} has the type {dtype}, which no MLflow column has")
            cols.append(ColSpec(_COLUMN_TYPES[dtype], name))
        return Schema(cols)

    names = list(order) if sorted(order) == sorted(sig.inputs) else sorted(sig.inputs)
    if "score" not in sig.outputs:
        raise ValueError(f"{RAW_SIGNATURE} has no 'score' output (outputs: {sorted(sig.outputs)})")
    return ModelSignature(inputs=columns(sig.inputs, names), outputs=columns(sig.outputs, ["score"]))


def _mlflow_model_dir(tmp: str, run_id: str, signature: Any, card: Mapping[str, Any]) -> str:
    """``MLmodel`` and the environment files that make the run's ``model/`` an MLflow model serving
    the ``saved_model/`` logged beside them by its ``serving_default`` signature."""
    import mlflow
    from mlflow.models import Model

    from downpour.artifact import RAW_SIGNATURE, SAVED_MODEL

    out = os.path.join(tmp, "mlflow-model")
    os.makedirs(out)
    frameworks = card.get("frameworks") or {}
    model = Model(artifact_path=MODEL_PATH, run_id=run_id, signature=signature,
                  metadata={"downpour_model_version": str(card.get("model_version")),
                            "downpour_data_version": str(card.get("data_version"))})
    # MLflow's loader of a SavedModel by one signature def: tf.saved_model.load + signatures[key]
    model.add_flavor("tensorflow", code=None, saved_model_dir=SAVED_MODEL, meta_graph_tags=["serve"],
                     signature_def_key=RAW_SIGNATURE, model_type="tf1-estimator")
    mlflow.pyfunc.add_to_model(model, loader_module="mlflow.tensorflow", conda_env="conda.yaml",
                               python_env="python_env.yaml")
    model.save(os.path.join(out, "MLmodel"))
    python = frameworks.get("python") or platform.python_version()
    tensorflow = frameworks.get("tensorflow")
    requirements = [f"mlflow=={mlflow.__version__}", f"tensorflow=={tensorflow}" if tensorflow else "tensorflow"]
    with open(os.path.join(out, "requirements.txt"), "w") as f:
        f.write("\n".join(requirements) + "\n")
    with open(os.path.join(out, "python_env.yaml"), "w") as f:
        f.write(f"python: {python}\nbuild_dependencies:\n- pip\ndependencies:\n- -r requirements.txt\n")
    with open(os.path.join(out, "conda.yaml"), "w") as f:
        f.write(f"name: mlflow-env\nchannels:\n- conda-forge\ndependencies:\n- python={python}\n- pip\n- pip:\n"
                + "".join(f"  - {r}\n" for r in requirements))
    return out


def publish_model(cfg: Config, run_id: str, artifact_uri: str, card: Mapping[str, Any], saved_model_dir: str,
                  tmp: str) -> Any | None:
    """Make the run's ``model/`` an MLflow model and, with the gate's decision, register it (see the
    module's docstring); returns the ``ModelVersion`` (None if not registered). Like logging, a failure
    is logged as an error and does not fail the evaluation."""
    from mlflow.tracking import MlflowClient

    from downpour.artifact import RAW_SIGNATURE

    version = str(card.get("model_version"))
    gate = (card.get("evaluation") or {}).get("gate")
    try:
        signature = serving_signature(saved_model_dir, (card.get("signatures") or {}).get(RAW_SIGNATURE) or ())
        if signature is None:
            LOG.warning("tracking: model %s has no %s signature (raw columns): logged as files only, not as an "
                        "MLflow model, and not registered", version, RAW_SIGNATURE)
            return None
        client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
        client.log_artifacts(run_id, _mlflow_model_dir(tmp, run_id, signature, card), MODEL_PATH)
        if not cfg.tracking.register_model:
            return None
        if not gate:
            LOG.info("tracking: model %s was evaluated without --gate: no decision to register", version)
            return None
        registry = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri, registry_uri=registry_uri(cfg))
        return register(cfg, registry, run_id, f"{artifact_uri.rstrip('/')}/{MODEL_PATH}", card, gate)
    except Exception as exc:  # noqa: BLE001 - the registry must not undo a finished evaluation either
        LOG.error("tracking: could not register model %s as %s at %s: %s: %s", version,
                  registered_model_name(cfg), public_uri(cfg), exc.__class__.__name__, cfg.scrub(str(exc)))
        return None


def register(cfg: Config, client: Any, run_id: str, source: str, card: Mapping[str, Any],
             gate: Mapping[str, Any]) -> Any:
    """The version of the registered model for this run (created once: evaluating the model again
    updates it), tagged with the gate's decision, and the aliases moved by it."""
    from mlflow.exceptions import MlflowException

    name, version = registered_model_name(cfg), str(card.get("model_version"))
    try:
        client.create_registered_model(name, tags={"downpour.name": cfg.name}, description=(
            f"Downpour {cfg.name}: each version is a model evaluated by the quality gate; alias {CHAMPION}: "
            f"the one promoted, {CHALLENGER}: the last one refused"))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    promoted = bool(gate.get("promoted"))
    tags = {TAG_VERSION: version, "downpour.data_version": str(card.get("data_version")),
            **_gate_tags(card), "downpour.gate_metric": str(gate.get("metric")),
            "downpour.gate_value": str(gate.get("value"))}
    reason = str(gate.get("reason", ""))[:5000]
    # one condition only (Unity Catalog's search takes one, and keeps names in lower case); a run holds
    # one version per registered model
    same = (lambda n: n.lower() == name.lower()) if is_unity_catalog_name(name) else (lambda n: n == name)
    found = [mv for mv in client.search_model_versions(f"run_id='{run_id}'") if same(mv.name)]
    if found:
        mv = found[0]
        for key, value in tags.items():
            client.set_model_version_tag(name, mv.version, key, value)
        client.update_model_version(name, mv.version, description=reason)
    else:
        mv = client.create_model_version(name, source, run_id=run_id, tags=tags, description=reason)
    move_aliases(client, name, str(mv.version), promoted, overtaken_by=_overtaken_by(gate, version))
    LOG.info("tracking: model %s is version %s of registered model %s (alias %s)", version, mv.version, name,
             CHAMPION if promoted else CHALLENGER)
    return mv


def move_aliases(client: Any, name: str, number: str, promoted: bool, overtaken_by: str | None = None) -> None:
    """Promoted: ``champion`` to version ``number`` (and ``challenger`` off it); refused: ``challenger``
    to it, ``champion`` untouched. A promotion already overtaken in the local registry moves nothing."""
    if not promoted:
        client.set_registered_model_alias(name, CHALLENGER, number)
        return
    if overtaken_by is not None:
        LOG.warning("tracking: registered model %s: version %s was promoted, but the registry's champion is now "
                    "model %s; alias %s left where it is", name, number, overtaken_by, CHAMPION)
        return
    client.set_registered_model_alias(name, CHAMPION, number)
    if str(client.get_registered_model(name).aliases.get(CHALLENGER)) == number:
        client.delete_registered_model_alias(name, CHALLENGER)


def _overtaken_by(gate: Mapping[str, Any], version: str) -> str | None:
    """The local registry's champion when a later evaluation has replaced ``version`` there, else None."""
    if not gate.get("promoted") or not gate.get("registry"):
        return None
    from downpour.training.registry import Registry

    current = (Registry(gate["registry"]).champion() or {}).get("model_version")
    return None if current in (None, version) else str(current)
