"""The training budget (steps, examples or epochs -> rounds of steps) and its learning-rate schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from downpour.config import TrainingConfig, load_config
from downpour.errors import ConfigError
from downpour.training.budget import COSINE_FLOOR, Budget, learning_rate_at, plan_budget

ROOT = Path(__file__).resolve().parents[1]


def test_a_steps_budget_does_not_depend_on_the_data_size():
    t = TrainingConfig(steps=3000, batch_size=1024, workers=2)
    small, large = plan_budget(t, 14_000), plan_budget(t, 14_000_000)
    assert small.steps == large.steps == 3000
    assert small.rounds == large.rounds == 10 and small.round_steps == 300
    assert small.pass_steps == 7 and large.pass_steps == math.ceil(14_000_000 / 2048)
    assert small.examples == 3000 * 2048 and small.said_as == "steps"
    assert Budget.from_dict(small.as_dict()) == small  # the plan's copy, as a worker reads it


def test_an_examples_budget_counts_rows_of_every_worker():
    b = plan_budget(TrainingConfig(examples=1_000_000, batch_size=500, workers=2, validation_every_steps=250), 10)
    assert (b.said_as, b.steps, b.rounds, b.round_steps) == ("examples", 1000, 4, 250)


def test_an_epochs_budget_is_passes_over_the_downsampled_split_as_before():
    b = plan_budget(TrainingConfig(epochs=4, batch_size=1024, workers=2), 13_900)
    assert (b.said_as, b.pass_steps, b.round_steps, b.rounds, b.steps) == ("epochs", 7, 7, 4, 28)
    assert plan_budget(TrainingConfig(), 1).said_as == "epochs" and TrainingConfig().epochs == 5


def test_the_learning_rate_warms_up_from_one_worker_rate_then_decays_to_the_floor():
    t = TrainingConfig(steps=1000, workers=4, learning_rate=0.01, warmup_steps=100, validation_every_steps=100)
    b = plan_budget(t, 10_000)
    assert learning_rate_at(0, b, 0.01, 4) == pytest.approx(0.01)
    assert learning_rate_at(50, b, 0.01, 4) == pytest.approx(0.025)
    assert learning_rate_at(100, b, 0.01, 4) == pytest.approx(0.04)
    assert learning_rate_at(550, b, 0.01, 4) == pytest.approx(0.04 * (COSINE_FLOOR + (1 - COSINE_FLOOR) / 2))
    assert learning_rate_at(1000, b, 0.01, 4) == pytest.approx(0.04 * COSINE_FLOOR)
    rates = [learning_rate_at(s, b, 0.01, 4) for s in range(100, 1001)]
    assert all(a >= c for a, c in zip(rates, rates[1:], strict=False))  # never rises after the warm-up
    flat = plan_budget(t.model_copy(update={"learning_rate_schedule": "constant"}), 10_000)
    assert learning_rate_at(999, flat, 0.01, 4) == pytest.approx(0.04)
    assert learning_rate_at(0, b, 0.01, 1) == pytest.approx(0.01 * 1)  # one worker: no warm-up needed


def test_the_budget_is_given_once_and_an_override_replaces_it(tmp_path):
    with pytest.raises(ValueError, match="training.steps and training.epochs"):
        TrainingConfig(steps=10, epochs=2)
    raw = yaml.safe_load((ROOT / "conf" / "crm.yaml").read_text())
    raw["training"].update({"steps": 3000, "epochs": 2})
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="give the budget once"):
        load_config(tmp_path / "both.yaml")
    cfg = load_config(tmp_path / "both.yaml", ["training.examples=100000"])  # the override replaces both
    assert (cfg.training.examples, cfg.training.steps, cfg.training.epochs) == (100000, None, None)
    # the validated config survives the trip to the workers (every budget key is dumped)
    assert TrainingConfig.model_validate(cfg.training.model_dump()) == cfg.training


def test_shipped_configs_accept_the_readme_epochs_override():
    cfg = load_config(ROOT / "conf" / "crm_telco.yaml", ["training.epochs=1"])
    assert cfg.training.epochs == 1 and cfg.training.steps is None and cfg.training.examples is None
    # one pass means one pass, even where the file's validation rounds are longer than a pass
    assert cfg.training.validation_every_steps == 40
    b = plan_budget(cfg.training, 1053)
    assert (b.pass_steps, b.round_steps, b.rounds, b.steps) == (5, 5, 1, 5)


def test_a_budget_shorter_than_a_round_is_one_round_of_the_budget_and_longer_ones_round_up():
    short = plan_budget(TrainingConfig(steps=30, validation_every_steps=40), 10_000)
    assert (short.steps, short.rounds, short.round_steps) == (30, 1, 30)
    long = plan_budget(TrainingConfig(steps=90, validation_every_steps=40), 10_000)
    assert (long.steps, long.rounds, long.round_steps) == (120, 3, 40)
