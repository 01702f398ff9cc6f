"""Config validation: every error path names its key."""

from __future__ import annotations

import ast
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from downpour.config import Config, config_from_dict, dotted_get, load_config, parse_duration
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


def test_a_spark_setting_is_one_dotted_key(conf_dir):
    """Spark's own keys contain dots: ``--set spark.conf.spark.sql.shuffle.partitions=8`` sets that key,
    not a tree of mappings that Spark would be handed as a string."""
    cfg = load_config(conf_dir / "crm_telco.yaml", ["spark.conf.spark.sql.shuffle.partitions=8",
                                                     "spark.conf.spark.ui.enabled=false"])
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": 8, "spark.ui.enabled": False}
    with pytest.raises(ConfigError, match="spark.conf"):
        load_config(conf_dir / "crm_telco.yaml", ['spark.conf={"spark": {"sql": 1}}'])


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


# ---- the prepare fingerprint covers the shard layout -------------------------------------------------

SHARDS_SOURCE = Path(__file__).resolve().parents[1] / "pipelines" / "shards.py"


def test_fingerprint_follows_the_shard_layout_not_other_training_keys(conf_dir):
    """Shards are laid out for ``training.workers``: another worker count is another data version,
    while epochs or the learning rate keep the prepared data."""
    from downpour.pipelines.prepare import compute_data_version

    base = load_config(conf_dir / "crm_telco.yaml", ["training.workers=2"])
    workers = load_config(conf_dir / "crm_telco.yaml", ["training.workers=3"])
    assert base.fingerprint() != workers.fingerprint()
    assert compute_data_version([], base, "s") != compute_data_version([], workers, "s")
    for other in (["training.epochs=1"], ["training.learning_rate=0.5"], ["training.batch_size=7"],
                  ["evaluation.gate.tolerance=0.1"], ["tracking.experiment=x"]):
        same = load_config(conf_dir / "crm_telco.yaml", ["training.workers=2", *other])
        assert same.fingerprint() == base.fingerprint(), other
        assert compute_data_version([], same, "s") == compute_data_version([], base, "s"), other


def _cfg_reads(source: str) -> tuple[set[str], list[str]]:
    """(every ``cfg.a.b`` key the source reads, the ways ``cfg`` escapes the analysis: passed to a
    function not defined in the source, aliased, or read as a whole section or method)."""
    tree = ast.parse(source)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    reads: set[str] = set()
    escapes: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "cfg":
                reads.add(".".join(reversed(chain)))
        elif isinstance(node, ast.Call):
            passed = [*node.args, *(k.value for k in node.keywords)]
            if any(isinstance(a, ast.Name) and a.id == "cfg" for a in passed):
                name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
                if name not in defined:
                    escapes.append(f"cfg passed to {name}()")
        elif isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Name) \
                and node.value.id == "cfg":
            escapes.append(f"cfg aliased at line {node.lineno}")
    return reads, escapes


def _other_value(value: Any, annotation: Any) -> Any:
    """A different valid value for a config field (to see whether the fingerprint notices)."""
    choices = [c for c in typing.get_args(annotation) if c != value]
    if typing.get_origin(annotation) is typing.Literal and choices:
        return choices[0]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.001
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 1
    if isinstance(value, list | tuple):
        return [*value, value[-1] if value else 1]
    if isinstance(value, dict):
        return {**value, "_dp_probe": 1}
    raise AssertionError(f"no mutation for {value!r} ({annotation}); extend _other_value")


def _leaf_keys(model: BaseModel, prefix: str) -> list[str]:
    out = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        out += _leaf_keys(value, f"{prefix}.{name}") if isinstance(value, BaseModel) else [f"{prefix}.{name}"]
    return out


def _with(cfg: Config, dotted: str) -> Config:
    """``cfg`` with the value at ``dotted`` changed (the sub-models rebuilt bottom-up)."""
    *parents, field = dotted.split(".")
    chain: list[BaseModel] = [cfg]
    for p in parents:
        chain.append(getattr(chain[-1], p))
    model = chain[-1]
    new: Any = model.model_copy(
        update={field: _other_value(getattr(model, field), type(model).model_fields[field].annotation)})
    for obj, name in zip(reversed(chain[:-1]), reversed(parents), strict=True):
        new = obj.model_copy(update={name: new})
    return new


def _unfingerprinted(cfg: Config, source: str) -> list[str]:
    """Keys the source reads whose change leaves ``cfg.fingerprint()`` as it was, and escapes."""
    reads, escapes = _cfg_reads(source)
    missing = list(escapes)
    for key in sorted(reads):
        target = dotted_get(cfg, key)
        if callable(target):
            missing.append(f"cfg.{key}() (a method: list the keys it reads)")
            continue
        leaves = _leaf_keys(target, key) if isinstance(target, BaseModel) else [key]
        missing += [k for k in leaves if _with(cfg, k).fingerprint() == cfg.fingerprint()]
    return missing


def test_every_config_key_the_shard_layout_reads_is_fingerprinted(conf_dir):
    """Adding a ``cfg.*`` read to pipelines/shards.py without fingerprinting it fails here."""
    cfg = load_config(conf_dir / "crm_telco.yaml")
    reads, _ = _cfg_reads(SHARDS_SOURCE.read_text())
    assert {"training.workers", "shards.min_row_groups_per_worker", "shards.row_group_rows",
            "shards.compression"} <= reads  # the analysis sees the reads we know of
    assert _unfingerprinted(cfg, SHARDS_SOURCE.read_text()) == []


def test_layout_coverage_check_catches_an_unfingerprinted_key(conf_dir):
    """The check above can fail: a layout read of a key outside the fingerprint, or a ``cfg`` handed
    to code the analysis cannot see, is reported."""
    cfg = load_config(conf_dir / "crm_telco.yaml")
    src = ("def plan(cfg):\n    return cfg.shards.row_group_rows * cfg.training.epochs\n\n"
           "def hidden(cfg):\n    return helper(cfg)\n")
    assert _unfingerprinted(cfg, src) == ["cfg passed to helper()", "training.epochs"]
    assert _unfingerprinted(cfg, "def f(cfg):\n    t = cfg.training\n    return t.workers\n") != []
