"""The model artifact: what ``train`` exports and evaluate, score, the registry and tracking read.

A model directory (``<output.path>/model`` or a registry version)::

    saved_model/        the SavedModel, with two signatures:
                          serve_features  (model-ready shard columns; evaluation)
                          serving_default (raw columns; score, with preprocessing inside)
                          explain         (raw columns; score and reason-code contributions)
    model_card.json     what the model is: version, data version, config, metrics (evaluate adds them)
    history.json        per-round training metrics (the report's curves)
    entity_history/     the data version's events, for window features at scoring (features/history.py)
    tensorboard/        training's TensorBoard logs
    manifest.json       registry versions only: the data version's manifest

One owner, so the card's name, its required fields and the signature names are defined once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from downpour import storage
from downpour.errors import DataContractError
from downpour.logs import LOG

CARD = "model_card.json"
HISTORY = "history.json"
SAVED_MODEL = "saved_model"
ENTITY_HISTORY = "entity_history"
TENSORBOARD = "tensorboard"
MANIFEST = "manifest.json"
# decision thresholds are multiples of 1 / DECISION_RESOLUTION; evaluate and score both compare
# floor(score * DECISION_RESOLUTION) with the threshold's bucket, so they act on the very same rows
DECISION_RESOLUTION = 1_000_000
FEATURES_SIGNATURE = "serve_features"
RAW_SIGNATURE = "serving_default"
EXPLAIN_SIGNATURE = "explain"  # raw inputs -> score and reason-code contributions (training/explain.py)
EXPLAIN_ALPHAS = "dp_ig_alphas"  # the explain signature's extra input: the path's points, 0 .. 1
CONTRIBUTIONS = "contributions"  # the explain signature's [B, features] output


def completeness_gap(contributions: Any, score: Any, baseline_score: float) -> np.ndarray:
    """The explain signature's contract, per row: |sum of the attributions - (score - baseline score)|,
    where the baseline score is the card's ``explain.baseline_score``; 0 for exact attributions."""
    total = np.asarray(contributions, dtype=np.float64).sum(axis=1)
    return np.abs(total - (np.asarray(score, dtype=np.float64) - float(baseline_score)))


@dataclass(frozen=True)
class ModelArtifact:
    """A model directory, its symlinks resolved once so a re-publication cannot swap it mid-job."""

    root: str

    @classmethod
    def at(cls, model_dir: str) -> ModelArtifact:
        return cls(storage.resolve(model_dir))

    @property
    def saved_model(self) -> str:
        return storage.join(self.root, SAVED_MODEL)

    @property
    def card_url(self) -> str:
        return storage.join(self.root, CARD)

    @property
    def history_url(self) -> str:
        return storage.join(self.root, HISTORY)

    @property
    def manifest_url(self) -> str:
        return storage.join(self.root, MANIFEST)

    def entity_history(self, card: dict[str, Any]) -> str:
        return storage.join(self.root, (card.get("entity_history") or {}).get("path") or ENTITY_HISTORY)

    def card(self, hint: str = "run `downpour train` first") -> dict[str, Any]:
        """The model card; a missing card or one without ``model_version`` is a data-contract error."""
        url = self.card_url
        if not storage.exists(url):
            raise DataContractError(f"{url}: no exported model (model_card.json is missing); {hint}")
        card = storage.read_json(url)
        if not isinstance(card, dict) or not card.get("model_version"):
            raise DataContractError(f"{url}: has no model_version")
        return card

    def history(self) -> Any | None:
        """Training's per-round metrics, or None (absent or not JSON: a report without curves)."""
        url = self.history_url
        try:
            return storage.read_json(url) if storage.exists(url) else None
        except ValueError:
            LOG.warning("%s is not valid JSON; no training curves in the report", url)
            return None

    def write_card(self, card: dict[str, Any]) -> None:
        storage.write_json_atomic(self.card_url, card)

    def write_history(self, history: Any) -> None:
        storage.write_json_atomic(self.history_url, history)
