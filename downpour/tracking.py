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
  ``model/saved_model`` (``tracking.log_model: false`` leaves the model out).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from downpour.config import Config
from downpour.errors import ConfigError
from downpour.logs import LOG, timed

TAG_VERSION = "downpour.model_version"
_MAX_PARAM = 500  # MLflow's historic limit on a param value


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
    model = ModelArtifact.at(layout.model)
    if not storage.exists(model.card_url):
        LOG.warning("tracking: %s is missing; nothing to log to MLflow", model.card_url)
        return None
    card = storage.read_json(model.card_url)
    history = model.history()
    saved_model = model.saved_model
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
                if cfg.tracking.log_model:
                    model = _local_copy(saved_model, tmp)
                    if model:
                        mlflow.log_artifacts(model, "model/saved_model")
            LOG.info("tracking: model %s logged to MLflow run %s (experiment %s)", version, run.info.run_id,
                     experiment.name)
            return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - tracking must not undo a finished evaluation
        LOG.error("tracking: could not log model %s to MLflow at %s: %s: %s", version, where,
                  exc.__class__.__name__, cfg.scrub(str(exc)))
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
