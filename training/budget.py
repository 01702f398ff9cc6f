"""The training budget: how many optimizer steps a run takes, how they split into validation rounds,
and the learning rate at each step.

Why: a budget in epochs ties the run length to the data size and the sampling (200k fraud rows with
negatives downsampled to 10% are 8 steps a pass), not to what the model needs. A budget in steps or
examples does not. The run is cut into *rounds* of ``round_steps`` steps; each round ends with a
validation pass, a checkpoint and the early-stopping check, so a Keras "epoch" here is a round. With
an epochs budget a round is one pass over the (downsampled) train split, as before.

The learning rate is a pure function of the global step (``learning_rate_at``), so a resumed run
follows the same schedule as an uninterrupted one: the step count is part of the optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from downpour.config import TrainingConfig

DEFAULT_ROUNDS = 10  # validation rounds of a steps/examples budget when validation_every_steps is unset
COSINE_FLOOR = 0.1   # the cosine schedule ends at this fraction of the peak learning rate


@dataclass(frozen=True)
class Budget:
    """A run's length in optimizer steps (every step: ``batch_size`` rows on each worker)."""

    said_as: str       # "steps", "examples" or "epochs": the key the config used
    steps: int         # total optimizer steps (rounds x round_steps)
    rounds: int        # validation rounds (Keras epochs)
    round_steps: int   # steps per round
    pass_steps: int    # steps in one pass over the (downsampled) train split
    warmup_steps: int  # steps of the warm-up from the one-worker to the scaled learning rate
    schedule: str      # "constant" or "cosine"
    global_batch: int  # rows per step, all workers together

    @property
    def examples(self) -> int:
        """Training examples the whole budget shows the model, all workers together."""
        return self.steps * self.global_batch

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        """The budget ``as_dict`` wrote (the plan's copy, on a worker); derived keys are ignored."""
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def plan_budget(t: TrainingConfig, train_rows: float) -> Budget:
    """The budget of ``t`` for a train split of ``train_rows`` rows per pass (after downsampling)."""
    global_batch = t.batch_size * t.workers
    pass_steps = max(1, math.ceil(train_rows / global_batch))
    if t.steps is not None or t.examples is not None:
        said_as = "steps" if t.steps is not None else "examples"
        wanted = t.steps if t.steps is not None else max(1, math.ceil(t.examples / global_batch))
        round_steps = t.validation_every_steps or max(1, math.ceil(wanted / DEFAULT_ROUNDS))
    else:
        said_as = "epochs"
        wanted = t.epochs * pass_steps
        round_steps = t.validation_every_steps or pass_steps
    round_steps = min(round_steps, wanted)  # a budget shorter than a round is one round of the budget
    rounds = max(1, math.ceil(wanted / round_steps))
    steps = rounds * round_steps
    warmup = t.warmup_steps if t.warmup_steps is not None else min(pass_steps, max(1, steps // 10))
    return Budget(said_as=said_as, steps=steps, rounds=rounds, round_steps=round_steps, pass_steps=pass_steps,
                  warmup_steps=min(warmup, steps), schedule=t.learning_rate_schedule, global_batch=global_batch)


def learning_rate_at(step: int, budget: Budget, base: float, workers: int) -> float:
    """The learning rate of global step ``step`` (0-based).

    Peak: ``base * workers`` (the linear scaling rule for a global batch ``workers`` times larger),
    reached by a linear warm-up from ``base`` over ``warmup_steps`` when ``workers > 1`` (large early
    steps at the scaled rate diverge). Then constant, or a cosine decay to ``COSINE_FLOOR`` of the
    peak at the end of the budget.
    """
    peak = base * workers
    if workers > 1 and budget.warmup_steps > 0 and step < budget.warmup_steps:
        return base + (peak - base) * step / budget.warmup_steps
    if budget.schedule == "constant":
        return peak
    span = max(1, budget.steps - budget.warmup_steps)
    progress = min(1.0, max(0.0, (step - budget.warmup_steps) / span))
    return peak * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
