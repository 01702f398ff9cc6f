"""Where every artifact of a run lives: the one place that joins their paths.

Under ``output.path``::

    prepared -> .versions/<data_version>-<build>   the published data version (PreparedLayout)
    .versions/                                      data versions, and builds in progress
    training/checkpoints/  training/tensorboard/    training's working state (resumable)
    model -> .model.versions/<model_version>       the published model (downpour.artifact.ModelArtifact)
    evaluation/scores/                              evaluate's per-row scores
    report/  (report.html, metrics.json)            evaluate's report

A data version (PreparedLayout)::

    train/ val/ test/          shards        quarantine/          rejected rows with a reason
    entity_history/            the events score needs for window features (features/history.py)
    feature_state.json         manifest.json (written last: its presence means "complete")

A scoring run (ScoringLayout), beside its ``--output`` URL::

    <output>                 the scores            } each a symlink to .<name>.versions/<stamp> on
    <output>_quarantine      rows not scored       } local disks, a directory elsewhere
    <output>_summary.json    counts, history, drift (written last: "complete")

Stages read and write these through the objects here, never by joining names by hand, so the layout
can only change in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from downpour import storage

PREPARED = "prepared"
VERSIONS = ".versions"
MANIFEST = "manifest.json"
FEATURE_STATE = "feature_state.json"
QUARANTINE = "quarantine"
ENTITY_HISTORY = "entity_history"
SPLITS = ("train", "val", "test")
MODEL = "model"
WORK = "training"
REPORT = "report"
REPORT_HTML = "report.html"


@dataclass(frozen=True)
class PreparedLayout:
    """The files of one prepared data version (staged or published)."""

    root: str

    def split(self, name: str) -> str:
        return storage.join(self.root, name)

    @property
    def manifest(self) -> str:
        return storage.join(self.root, MANIFEST)

    @property
    def feature_state(self) -> str:
        return storage.join(self.root, FEATURE_STATE)

    @property
    def quarantine(self) -> str:
        return storage.join(self.root, QUARANTINE)

    @property
    def entity_history(self) -> str:
        return storage.join(self.root, ENTITY_HISTORY)


@dataclass(frozen=True)
class RunLayout:
    """The artifacts of one run under ``output.path``."""

    root: str

    @property
    def prepared(self) -> PreparedLayout:
        """The published data version, through the ``prepared`` pointer (resolve it to pin a version)."""
        return PreparedLayout(storage.join(self.root, PREPARED))

    @property
    def versions(self) -> str:
        return storage.join(self.root, VERSIONS)

    @property
    def model(self) -> str:
        """The published model directory (a pointer to its version)."""
        return storage.join(self.root, MODEL)

    @property
    def checkpoints(self) -> str:
        return storage.join(self.root, WORK, "checkpoints")

    @property
    def tensorboard(self) -> str:
        return storage.join(self.root, WORK, "tensorboard")

    @property
    def evaluation_scores(self) -> str:
        return storage.join(self.root, "evaluation", "scores")

    @property
    def report(self) -> str:
        return storage.join(self.root, REPORT)

    @property
    def report_html(self) -> str:
        return storage.join(self.root, REPORT, REPORT_HTML)

    @property
    def report_metrics(self) -> str:
        return storage.join(self.root, REPORT, "metrics.json")


@dataclass(frozen=True)
class ScoringLayout:
    """The outputs of one ``downpour score`` run, named from its ``--output`` URL."""

    output: str

    @property
    def scores(self) -> str:
        return self.output.rstrip("/")

    @property
    def quarantine(self) -> str:
        return f"{self.scores}_quarantine"

    @property
    def summary(self) -> str:
        """Counts, model version, history and drift of the run: written after both directories."""
        return f"{self.scores}_summary.json"


CHAMPION = "champion.json"
REGISTRY_VERSIONS = "versions"
REGISTRY_HISTORY = "history.jsonl"
METRICS = "metrics.json"


@dataclass(frozen=True)
class RegisteredLayout:
    """One registered model version: a copy of the model (a ``ModelArtifact`` root) with the metrics it
    was registered with and the feature state and manifest of the data it was trained on."""

    root: str

    @property
    def model(self) -> str:
        return storage.join(self.root, MODEL)

    @property
    def feature_state(self) -> str:
        return storage.join(self.root, FEATURE_STATE)

    @property
    def manifest(self) -> str:
        return storage.join(self.root, MANIFEST)

    @property
    def metrics(self) -> str:
        return storage.join(self.root, METRICS)


@dataclass(frozen=True)
class RegistryLayout:
    """The model registry (``evaluation.gate.registry``)::

        champion.json            the pointer (downpour/champion.py says how it is followed)
        history.jsonl            every gate decision
        versions/<model_version>/ a RegisteredLayout
    """

    root: str

    @property
    def champion(self) -> str:
        return storage.join(self.root, CHAMPION)

    @property
    def history(self) -> str:
        return storage.join(self.root, REGISTRY_HISTORY)

    @property
    def lock(self) -> str:
        return storage.join(self.root, ".lock")

    @property
    def versions(self) -> str:
        return storage.join(self.root, REGISTRY_VERSIONS)

    def version(self, model_version: str) -> RegisteredLayout:
        return RegisteredLayout(storage.join(self.root, REGISTRY_VERSIONS, model_version))

    def pointed(self, path: str) -> RegisteredLayout:
        """The version a (checked) champion pointer names, relative to the registry."""
        return RegisteredLayout(storage.join(self.root, path))

    @staticmethod
    def pointer(model_version: str) -> str:
        """What ``champion.json`` records for a version: its path relative to the registry."""
        return f"{REGISTRY_VERSIONS}/{model_version}"
