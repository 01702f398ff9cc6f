"""Config validation: every error path names its key."""

from __future__ import annotations

import pytest
import yaml

from downpour.config import config_from_dict, load_config, parse_duration
from downpour.errors import ConfigError


def _telco(conf_dir):
    return yaml.safe_load((conf_dir / "crm_telco.yaml").read_text())


def test_shipped_configs_load(conf_dir):
    for name in ("crm_telco.yaml", "fraud.yaml"):
        cfg = load_config(conf_dir / name)
        assert cfg.output.path and cfg.schema_


def test_overrides_and_env(conf_dir, monkeypatch):
    monkeypatch.setenv("DOWNPOUR_TELCO_PATH", "/data/telco.csv")
    cfg = load_config(conf_dir / "crm_telco.yaml", ["training.workers=3", "training.placement.embeddings=sharded",
                                                     "training.devices_per_worker=2"])
    assert cfg.input.path == "/data/telco.csv"
    assert cfg.training.workers == 3
    assert cfg.training.placement == {"embeddings": "sharded"}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["training.workers=0"], "training.workers"),
        (["training.wokers=2"], "training.wokers"),
        (["split.fractions.train=0.9"], "split.fractions"),
        (["label.column=nope"], "label.column"),
        (["training.batch_size=abc"], "training.batch_size"),
        (["schema.tenure=int64x"], "schema"),
        (["features.numeric=[nope]"], "features.numeric[0]"),
        (["training.placement.head=3"], "training.placement.head"),
        (["training.placement.head=sharded"], "training.placement.head"),
        (["training.placement.bogus=0"], "training.placement.bogus"),
        (["input.format=xml"], "input.format"),
        (["cleaning.nulls.TotalCharges.action=impute", "cleaning.nulls.TotalCharges.value=null"],
         "cleaning.nulls.TotalCharges"),
        (["pii.hash=[tenure]"], "pii"),
    ],
)
def test_errors_name_the_key(conf_dir, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(conf_dir / "crm_telco.yaml", overrides)
    assert key in str(err.value)


def test_missing_required_and_env(conf_dir, monkeypatch):
    raw = _telco(conf_dir)
    del raw["label"]
    with pytest.raises(ConfigError, match="label: required key is missing"):
        config_from_dict(raw)
    raw = _telco(conf_dir)
    raw["output"]["path"] = "${DOWNPOUR_SURELY_UNSET_VAR}/x"
    monkeypatch.delenv("DOWNPOUR_SURELY_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError, match=r"output.path: environment variable \$\{DOWNPOUR_SURELY_UNSET_VAR\}"):
        config_from_dict(raw)


def test_bad_set_syntax(conf_dir):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(conf_dir / "crm_telco.yaml", ["training.workers"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(conf_dir / "nope.yaml")


def test_time_split_needs_column(conf_dir):
    raw = _telco(conf_dir)
    raw["split"] = {"method": "time", "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}}
    with pytest.raises(ConfigError, match="split.column"):
        config_from_dict(raw)


def test_durations():
    assert parse_duration("1h") == 3600
    assert parse_duration("7d") == 7 * 86400
    with pytest.raises(ValueError):
        parse_duration("7 days")


def test_fingerprint_ignores_training(conf_dir):
    a = load_config(conf_dir / "crm_telco.yaml")
    b = load_config(conf_dir / "crm_telco.yaml", ["training.epochs=1"])
    c = load_config(conf_dir / "crm_telco.yaml", ["split.seed=7"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
