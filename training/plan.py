"""The training plan: what every Horovod rank needs, decided once by the driver.

``make_plan`` reads the prepared data's manifest and the config and fixes the run: the splits, the
budget (steps per validation round, rounds), the imbalance handling and its prior correction, the
checkpoint key and the output locations. The result is one frozen ``RankPlan``, pickled to every
worker, so all ranks train the same run. The two recovery drills (``DOWNPOUR_FAIL_AFTER_EPOCH``,
``DOWNPOUR_KILL_WORKER``) are read here, on the driver, and travel in the plan.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from downpour import storage
from downpour.config import Config
from downpour.errors import ConfigError, DataContractError
from downpour.layout import RunLayout
from downpour.logs import LOG
from downpour.training.budget import Budget, plan_budget
from downpour.training.checkpoints import run_key
from downpour.training.export import keep_negatives, logit_shift, positive_weight
from downpour.training.input import PreparedData, SplitInfo, expected_train_rows

FAIL_ENV = "DOWNPOUR_FAIL_AFTER_EPOCH"
KILL_ENV = "DOWNPOUR_KILL_WORKER"  # rank:epoch:batch -> that rank SIGKILLs itself mid-epoch


@dataclass(frozen=True)
class RankPlan:
    """Everything a rank needs, as plain data (pickled to the workers)."""

    config: dict[str, Any]         # the validated config, dumped (a rank validates it again: ``cfg()``)
    prepared_url: str
    data_version: str
    feature_state: dict[str, Any]  # feature_state.json of the data version
    train: SplitInfo
    val: SplitInfo
    steps_per_epoch: int           # optimizer steps of one validation round (a Keras epoch)
    keep_negatives: float          # P(keep) of a negative row in the training stream
    positive_weight: float
    logit_shift: float             # what export adds to the logit to undo the imbalance handling
    monitor: str                   # the metric early stopping and the best checkpoint watch
    checkpoints: str
    tensorboard: str
    staging: str                   # where rank 0 exports; the driver publishes it
    run_key: str                   # checkpoints of another run key are not resumed
    budget: Budget
    fresh: bool
    fail_after_epoch: int | None = None
    kill_worker: dict[str, int] | None = None

    def cfg(self) -> Config:
        return Config.model_validate(self.config)


def make_plan(cfg: Config, prepared: PreparedData, fresh: bool) -> RankPlan:
    """The run ``cfg`` asks for on ``prepared``; warns about what will not work as configured."""
    t = cfg.training
    train, val = prepared.split("train"), prepared.split("val")
    if train.rows <= 0:
        raise DataContractError(f"{train.url}: the train split is empty")
    if t.imbalance != "none" and train.positives == 0:
        LOG.warning("train: no positives in the train split; training.imbalance=%s has nothing to balance",
                    t.imbalance)
    keep = keep_negatives(t)
    pos_w = positive_weight(t, train.positives, train.negatives)
    budget = plan_budget(t, expected_train_rows(train, keep))
    steps = budget.round_steps
    monitor = t.early_stopping_metric
    if monitor.startswith("val_") and val.rows == 0:
        LOG.warning("train: the val split is empty; early stopping watches %s instead of %s", monitor[4:], monitor)
        monitor = monitor[4:]
    for split in (train, val):
        if 0 < split.row_groups < t.workers:
            LOG.warning("train: %s has %d row group(s) for %d workers; every worker reads all of it "
                        "(raise shards.min_row_groups_per_worker)", split.url, split.row_groups, t.workers)
    layout = RunLayout(cfg.output.path)
    plan = RankPlan(
        config=cfg.model_dump(mode="json", by_alias=True), prepared_url=prepared.url,
        data_version=prepared.data_version, feature_state=prepared.feature_state, train=train, val=val,
        steps_per_epoch=steps, keep_negatives=keep, positive_weight=pos_w, logit_shift=logit_shift(t, pos_w),
        monitor=monitor, checkpoints=layout.checkpoints, tensorboard=layout.tensorboard,
        staging=storage.staging_dir(layout.model), run_key=run_key(cfg, prepared.data_version, budget),
        budget=budget, fresh=fresh, fail_after_epoch=_fail_after_epoch(),
        kill_worker=_kill_worker(t.workers, budget.rounds, steps),
    )
    LOG.info("train plan: data_version=%s, %d train rows (%d positives); budget %d steps (%d rounds of %d, "
             "given in %s; a pass is %d steps) x %d workers x batch %d = %d examples; learning rate %s, "
             "warm-up %d steps; imbalance=%s (keep negatives %.3g, positive weight %.3g)",
             prepared.data_version, train.rows, train.positives, budget.steps, budget.rounds, steps,
             budget.said_as, budget.pass_steps, t.workers, t.batch_size, budget.examples, budget.schedule,
             budget.warmup_steps, t.imbalance, keep, pos_w)
    return plan


def _fail_after_epoch() -> int | None:
    """The recovery-drill hook: ``DOWNPOUR_FAIL_AFTER_EPOCH=N`` fails rank 0 after epoch N."""
    text = os.environ.get(FAIL_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{FAIL_ENV}: expected an epoch number >= 1, got {text!r}")
    return int(text)


def _kill_worker(workers: int, epochs: int, steps: int) -> dict[str, int] | None:
    """The worker-loss drill: ``DOWNPOUR_KILL_WORKER=rank:epoch:batch`` makes that rank kill itself
    (SIGKILL) after ``batch`` steps of round ``epoch`` (1-based; a round is a Keras epoch). A drill
    that could never fire is an error."""
    text = os.environ.get(KILL_ENV, "").strip()
    if not text:
        return None
    m = re.fullmatch(r"(\d+):(\d+):(\d+)", text)
    if not m:
        raise ConfigError(f"{KILL_ENV}: expected rank:epoch:batch (e.g. 1:2:3), got {text!r}")
    rank, epoch, batch = (int(g) for g in m.groups())
    if rank >= workers:
        raise ConfigError(f"{KILL_ENV}: rank {rank} does not exist with training.workers={workers}")
    if not 1 <= epoch <= epochs:
        raise ConfigError(f"{KILL_ENV}: epoch {epoch} is not in 1..{epochs} (the budget's validation rounds)")
    if not 1 <= batch <= steps:
        raise ConfigError(f"{KILL_ENV}: batch {batch} is not in 1..{steps} (the steps per round)")
    return {"rank": rank, "epoch": epoch, "batch": batch}
