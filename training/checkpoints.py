"""Per-epoch training checkpoints: written by rank 0, atomically; resumed from the last complete one.

Layout under ``<output.path>/training/checkpoints/``::

    epoch-000003/            model + optimizer state after 3 epochs (tf.train.Checkpoint)
    best-000002/             model weights of epoch 2, the best so far (early-stopping metric)
    latest.json              written last: names the epoch and best directories, plus the run's state

Every directory is written under a temporary name and renamed into place, and is never rewritten
while ``latest.json`` names it: the best weights go to a new ``best-<epoch>`` directory rather than
replacing one fixed ``best/``. ``latest.json`` is replaced (atomically) only after both, so it is the
single commit point: a reader sees the previous (state, epoch weights, best weights) triple or the new
one, never best weights that do not match the recorded state. Directories ``latest.json`` no longer
names are pruned after it was replaced. ``latest.json`` also carries what Keras callbacks need to
carry on exactly (epochs completed, per-epoch history, early-stopping state) and a ``run_key``:
checkpoints made from other data or another model shape are ignored instead of being loaded into the
wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any

from downpour import storage
from downpour.config import Config
from downpour.logs import LOG
from downpour.training.budget import Budget

LATEST = "latest.json"
BEST = "best"  # prefix of best-<epoch> directories (a bare "best/" is what older versions wrote)
_KEEP = 2  # epoch checkpoints kept (the newest and the one before it)


def run_key(cfg: Config, data_version: str, budget: Budget) -> str:
    """What a checkpoint must match to be resumed: the data version and everything that shapes the
    model, its optimizer, its learning-rate schedule or its input stream: the round length and the
    warm-up (by default both derived from the budget's length) and, for a cosine schedule, the
    length itself. So raising the budget continues training only under a constant schedule with
    ``validation_every_steps`` and ``warmup_steps`` set, from a budget of at least one round (a
    shorter one is a round of its own length); otherwise it starts fresh."""
    t = cfg.training
    relevant = {
        "round_steps": budget.round_steps, "warmup_steps": budget.warmup_steps, "schedule": budget.schedule,
        "schedule_steps": budget.steps if budget.schedule != "constant" else None,
        "data_version": data_version,
        "hidden_units": t.hidden_units, "dropout": t.dropout, "placement": t.placement,
        "devices_per_worker": t.devices_per_worker, "imbalance": t.imbalance,
        "downsample_negatives": t.downsample_negatives, "positive_weight": t.positive_weight,
        "learning_rate": t.learning_rate, "batch_size": t.batch_size, "seed": t.seed,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointStore:
    """Checkpoints of one training run under ``url``."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key

    # ---- reading ---------------------------------------------------------------------------------------
    def latest(self) -> dict[str, Any] | None:
        """The state of the last complete checkpoint of *this* run, or None."""
        url = storage.join(self.url, LATEST)
        if not storage.exists(url):
            return None
        try:
            state = storage.read_json(url)
        except (OSError, ValueError) as exc:
            LOG.warning("checkpoints: %s is unreadable (%s); starting fresh", url, exc)
            return None
        if state.get("run_key") != self.key:
            LOG.warning("checkpoints in %s belong to other data or another model configuration "
                        "(run key %s, now %s); starting fresh", self.url, state.get("run_key"), self.key)
            return None
        if not storage.exists(storage.join(self.url, state.get("path", ""), "ckpt.index")):
            LOG.warning("checkpoints: %s names %s, which is missing; starting fresh", url, state.get("path"))
            return None
        return state

    def restore(self, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
        """Load the model and optimizer state of ``state``'s checkpoint. The optimizer's slots must exist
        already (``train.py`` creates them up front), so they are loaded now, not at the first step,
        and can be broadcast to the other ranks before it."""
        import tensorflow as tf

        with self._local_copy(state["path"]) as path:
            tf.train.Checkpoint(model=model, optimizer=optimizer).read(os.path.join(path, "ckpt")).expect_partial()

    def restore_best(self, model: Any, state: dict[str, Any]) -> bool:
        """Load the best epoch's weights into ``model``; False when there is no best checkpoint, or
        when the directory ``state`` names holds another epoch than its recorded best (never loaded)."""
        import tensorflow as tf

        if not state.get("best_path") or not storage.exists(storage.join(self.url, state["best_path"], "ckpt.index")):
            return False
        m = re.fullmatch(rf"{BEST}-(\d+)", state["best_path"])
        best_epoch = (state.get("best") or {}).get("epoch")
        if m and best_epoch is not None and int(m.group(1)) != int(best_epoch):
            LOG.warning("checkpoints: %s holds epoch %s, but the recorded best epoch is %s; not loading it",
                        state["best_path"], int(m.group(1)), best_epoch)
            return False
        with self._local_copy(state["best_path"]) as path:
            tf.train.Checkpoint(model=model).read(os.path.join(path, "ckpt")).expect_partial()
        return True

    class _Copy:
        def __init__(self, store: CheckpointStore, name: str) -> None:
            self.store, self.name, self.tmp = store, name, None

        def __enter__(self) -> str:
            url = storage.join(self.store.url, self.name)
            if storage.is_local(url):
                return storage.local_path(url)
            self.tmp = tempfile.mkdtemp(prefix="downpour-ckpt-")
            return storage.download_dir(url, self.tmp)

        def __exit__(self, *exc: Any) -> None:
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _local_copy(self, name: str) -> CheckpointStore._Copy:
        return CheckpointStore._Copy(self, name)

    # ---- writing (rank 0) ----------------------------------------------------------------------------
    def save(self, model: Any, optimizer: Any, state: dict[str, Any], best: bool) -> dict[str, Any]:
        """Write the checkpoint of ``state['epoch']`` (and, when ``best``, the best weights into a new
        directory), then ``latest.json`` naming both; returns the state as written."""
        import tensorflow as tf

        epoch = int(state["epoch"])
        name = f"epoch-{epoch:06d}"
        self._write_dir(name, lambda d: tf.train.Checkpoint(model=model, optimizer=optimizer).write(
            os.path.join(d, "ckpt")))
        state = {**state, "run_key": self.key, "path": name}
        if best:
            best_name = self._best_name(epoch)
            self._write_dir(best_name, lambda d: tf.train.Checkpoint(model=model).write(os.path.join(d, "ckpt")))
            state["best_path"] = best_name
        storage.write_json_atomic(storage.join(self.url, LATEST), state)  # the commit point
        self._prune(keep={name, state.get("best_path") or name})
        return state

    def _best_name(self, epoch: int) -> str:
        """A directory of its own per best epoch: the one ``latest.json`` names is never replaced."""
        return f"{BEST}-{epoch:06d}"

    def _write_dir(self, name: str, write: Any) -> None:
        """Write a checkpoint directory under a temporary name, then move it to ``name``."""
        final = storage.join(self.url, name)
        if storage.is_local(final):
            root = storage.local_path(self.url)
            os.makedirs(root, exist_ok=True)
            tmp = os.path.join(root, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            write(tmp)
            old = None
            if os.path.exists(storage.local_path(final)):
                old = os.path.join(root, f".old-{name}-{uuid.uuid4().hex[:8]}")
                os.replace(storage.local_path(final), old)
            os.replace(tmp, storage.local_path(final))
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return
        tmp = tempfile.mkdtemp(prefix="downpour-ckpt-")
        try:
            write(tmp)
            staging = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
            storage.upload_dir(tmp, staging)
            storage.delete_dir(final)
            storage.move(staging, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, keep: set[str]) -> None:
        names = storage.listdir(self.url)
        epochs = sorted(n for n in names if n.startswith("epoch-"))
        keep = keep | set(epochs[-_KEEP:])
        for n in names:
            if n == LATEST or n in keep:
                continue
            if n == BEST or n.startswith(("epoch-", f"{BEST}-", ".tmp-", ".old-")) or ".tmp-" in n:
                storage.delete_dir(storage.join(self.url, n))

    def clear(self) -> None:
        """Forget every checkpoint (``train --fresh``)."""
        storage.delete_dir(self.url)
