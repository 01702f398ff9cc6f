"""A file-system model registry and the quality gate that decides what becomes the champion.

Layout under ``evaluation.registry`` (default ``<output.path>/registry``)::

    versions/<model_version>/model/...          a copy of the exported model directory
    versions/<model_version>/metrics.json       the metrics it was registered with
    versions/<model_version>/feature_state.json the feature state its serve_features inputs assume
    versions/<model_version>/manifest.json      the manifest of its training data (imputation values)
    champion.json                               the pointer: replaced atomically (temp file + os.replace)
    history.jsonl                               one JSON line per gate decision (promoted or refused)

Readers never see a half-written pointer or version: both are written beside their final name and
renamed into place. Promotion holds an exclusive lock and re-checks the champion it compared against,
so two evaluations racing cannot both "win" against a stale champion.

Nor does a reader follow a pointer out of the registry (downpour/champion.py owns that rule, because
scoring follows the pointer too).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from downpour import champion, storage
from downpour.config import Config
from downpour.errors import ConfigError, DataContractError, DownpourError, GateRefused
from downpour.layout import RegisteredLayout, RegistryLayout
from downpour.logs import LOG


def local_path(url: str, key: str) -> Path:
    """A registry or model URL as a local (or mounted) path, by storage's URL rules (``file:/x`` as Spark
    qualifies it, ``dbfs:/``); other schemes are a config error."""
    if not storage.is_local(url):
        raise ConfigError(f"{key}: {url!r} must be a local or mounted path (file://, dbfs:/ or a path); "
                          "the registry renames files atomically, which object stores cannot do")
    return Path(storage.local_path(url))


def registry_root(cfg: Config) -> Path:
    if cfg.evaluation.registry:
        return local_path(cfg.evaluation.registry, "evaluation.registry")
    return local_path(cfg.output.path.rstrip("/") + "/registry", "output.path (registry default)")


def jsonable(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, recursively, so files are strict JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON beside ``path`` then rename over it: readers see the old or the new file, never half."""
    obj = jsonable(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class GateDecision:
    metric: str
    tolerance: float
    model_version: str
    value: float
    champion_version: str | None
    champion_value: float | None
    promoted: bool
    reason: str
    baseline_value: float | None = None  # the LR baseline's test metric, when the gate compared with it
    baseline_tolerance: float | None = None

    def message(self) -> str:
        return self.reason


def against_baseline(decision: GateDecision, value: float, baseline_value: float | None,
                     tolerance: float) -> GateDecision:
    """``decision`` also requiring the model's ``value >= baseline_value - tolerance``, both on the test
    shards (pure): a deep model that loses to the logistic regression beside it is refused even when it
    beats the champion. An undefined figure refuses too: never promote blind."""
    if value is None or value != value:
        ok, why = False, f"its test {decision.metric} is undefined"
    elif baseline_value is None or baseline_value != baseline_value:
        ok, why = False, f"the LR baseline's test {decision.metric} is undefined"
    else:
        ok = value >= baseline_value - tolerance
        why = (f"test {decision.metric} on the test shards {value:.4f} {'>=' if ok else '<'} LR baseline "
               f"{baseline_value:.4f} - tolerance {tolerance:g}")
    if ok:
        reason = f"{decision.reason}; {why}"
    elif decision.promoted:
        reason = f"model {decision.model_version} refused: {why} (evaluation.gate.vs_baseline)"
    else:
        reason = f"{decision.reason}; also {why} (evaluation.gate.vs_baseline)"
    return replace(decision, promoted=decision.promoted and ok, reason=reason,
                   baseline_value=baseline_value, baseline_tolerance=tolerance)


def decide(metric: str, tolerance: float, model_version: str, value: float,
           champion_version: str | None, champion_value: float | None) -> GateDecision:
    """Promote unless the new model is worse than the champion by more than ``tolerance`` (pure)."""
    if value is None or value != value:  # None or NaN: nothing to compare, never promote blindly
        return GateDecision(metric, tolerance, model_version, float("nan"), champion_version,
                            champion_value, False, f"model {model_version}: test {metric} is undefined")
    if champion_version is None:
        return GateDecision(metric, tolerance, model_version, value, None, None, True,
                            f"model {model_version} promoted: no champion yet (test {metric}={value:.4f})")
    if champion_version == model_version:
        return GateDecision(metric, tolerance, model_version, value, champion_version, champion_value, True,
                            f"model {model_version} is already the champion (test {metric}={value:.4f})")
    assert champion_value is not None
    ok = value >= champion_value - tolerance
    verb = "promoted" if ok else "refused"
    rel = ">=" if ok else "<"
    return GateDecision(
        metric, tolerance, model_version, value, champion_version, champion_value, ok,
        f"model {model_version} {verb}: test {metric} {value:.4f} {rel} champion {champion_version} "
        f"{champion_value:.4f} - tolerance {tolerance:g} (both scored on the same test split)",
    )


@dataclass(frozen=True)
class TrainedOn:
    """The data a registered model was trained on: a champion with the same feature state is compared
    on the current shards, one with another on the raw test rows (training/evaluate.py)."""

    feature_state: dict[str, Any]
    manifest: dict[str, Any]


class Registry:
    """Versions, the champion pointer and the decision log under one local directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.layout = RegistryLayout(str(self.root))

    # ---- reading ---------------------------------------------------------------------------------
    def champion(self) -> dict[str, Any] | None:
        p = Path(self.layout.champion)
        if not p.exists():
            return None
        rec = json.loads(p.read_text())
        if not isinstance(rec, dict):
            raise DataContractError(f"{p}: not a champion record (a JSON object with model_version and path)")
        rec["path"] = champion.check_pointer(self.root, rec.get("path"), str(p))
        if not Path(self.layout.pointed(rec["path"]).model).is_dir():
            raise DownpourError(f"registry {self.root}: champion {rec.get('model_version')} points to "
                                f"{rec['path']}, which is missing; restore it or remove {p}")
        return rec

    def champion_model_dir(self) -> Path | None:
        rec = self.champion()
        return None if rec is None else Path(self.layout.pointed(rec["path"]).model)

    def version_dir(self, model_version: str) -> Path:
        if not model_version or "/" in model_version or model_version.startswith("."):
            raise DownpourError(f"registry: bad model_version {model_version!r}")
        return Path(self.layout.version(model_version).root)

    def history(self) -> list[dict[str, Any]]:
        p = Path(self.layout.history)
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    # ---- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.layout.lock, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def register(self, model_dir: str | os.PathLike[str], model_version: str, metrics: dict[str, Any],
                 data: TrainedOn | None = None) -> Path:
        """Copy the model to ``versions/<model_version>`` with its metrics and the feature state and
        manifest of the data it was trained on; idempotent per version."""
        dest = self.version_dir(model_version)
        registered = RegisteredLayout(str(dest))
        if Path(registered.model).is_dir():
            write_json_atomic(registered.metrics, metrics)
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_version}.", dir=dest.parent))
        try:
            staged = RegisteredLayout(str(tmp))
            shutil.copytree(model_dir, staged.model)
            if data is not None:
                write_json_atomic(staged.feature_state, data.feature_state)
                write_json_atomic(staged.manifest, data.manifest)
            write_json_atomic(staged.metrics, metrics)
            os.rename(tmp, dest)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not Path(registered.model).is_dir():  # not "another process registered it meanwhile"
                raise DownpourError(f"registry: could not copy {model_dir} to {dest}: {exc}") from exc
        return dest

    def log(self, decision: GateDecision, **extra: Any) -> None:
        rec = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(decision), **extra}
        rec = {k: (None if isinstance(v, float) and v != v else v) for k, v in rec.items()}
        with self._lock(), open(self.layout.history, "a") as fh:
            fh.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def promote(self, decision: GateDecision, expected_champion: str | None, **extra: Any) -> dict[str, Any]:
        """Point ``champion.json`` at the decision's version, if the champion is still the one compared."""
        if not Path(self.layout.version(decision.model_version).model).is_dir():
            raise DownpourError(f"registry: version {decision.model_version} is not registered")
        with self._lock():
            current = self.champion()
            current_v = current["model_version"] if current else None
            if current_v != expected_champion:
                raise DownpourError(
                    f"registry {self.root}: the champion changed to {current_v} while model "
                    f"{decision.model_version} was compared with {expected_champion}; run the gate again")
            rec = {
                "model_version": decision.model_version,
                "path": RegistryLayout.pointer(decision.model_version),
                "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "metric": decision.metric, "value": decision.value,
                "previous": current_v, **extra,
            }
            write_json_atomic(self.layout.champion, rec)
        LOG.info("registry %s: champion is now %s", self.root, decision.model_version)
        return rec


def enforce(registry: Registry, decision: GateDecision, model_dir: str | os.PathLike[str],
            metrics: dict[str, Any], data: TrainedOn | None = None, **extra: Any) -> dict[str, Any]:
    """Act on a decision: register + promote, or log the refusal and raise GateRefused (exit code 4)."""
    if not decision.promoted:
        registry.log(decision, **extra)
        LOG.warning("quality gate: %s", decision.reason)
        raise GateRefused(decision.reason)
    registry.register(model_dir, decision.model_version, metrics, data)
    if decision.champion_version == decision.model_version:
        rec = registry.champion() or {}
    else:
        rec = registry.promote(decision, expected_champion=decision.champion_version, **extra)
    registry.log(decision, **extra)
    LOG.info("quality gate: %s", decision.reason)
    return rec
