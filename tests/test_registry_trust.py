"""champion.json's pointer is followed only inside the registry: a tampered one is refused (exit 3)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from downpour import champion as C
from downpour.errors import DataContractError
from downpour.layout import CHAMPION
from downpour.training import registry as R

ROOT = Path(__file__).resolve().parents[1]


def _model_dir(base: Path, marker: str) -> Path:
    d = base / "model"
    (d / "saved_model").mkdir(parents=True)
    (d / "saved_model" / "saved_model.pb").write_bytes(marker.encode())
    return base


def _registry(tmp_path: Path) -> R.Registry:
    """A registry whose champion v1 was promoted the normal way, and a decoy model outside it."""
    reg = R.Registry(tmp_path / "registry")
    src = _model_dir(tmp_path / "src", "champion")
    R.enforce(reg, R.decide("roc_auc", 0.0, "v1", 0.8, None, None), src / "model", {})
    _model_dir(tmp_path / "elsewhere", "decoy")
    return reg


def _tamper(reg: R.Registry, path: str) -> None:
    rec = json.loads(Path(reg.layout.champion).read_text())
    R.write_json_atomic(reg.root / CHAMPION, {**rec, "path": path})


def _tampered_pointers(tmp_path: Path) -> dict[str, str]:
    """name -> a champion path that leaves the registry (each one resolves to the decoy, if followed)."""
    return {
        "dotdot": "../elsewhere",
        "deep_dotdot": "versions/../../elsewhere",
        "absolute": str(tmp_path / "elsewhere"),
        "file_scheme": (tmp_path / "elsewhere").as_uri(),
        "other_scheme": "s3a://attacker-bucket/elsewhere",
        "other_host": "//attacker.example.com/elsewhere",
        "symlink": "versions/escape",  # a link inside the registry to the decoy outside it
    }


def _followed_outside(reg: R.Registry, tmp_path: Path) -> dict[str, str]:
    """For each tampered pointer: 'refused' (DataContractError naming champion.json) by every loading
    path, or what they did instead ('followed to <real dir>' / another error)."""
    os.symlink(tmp_path / "elsewhere", reg.root / "versions" / "escape")
    loaders = {
        "Registry.champion": lambda: reg.root / reg.champion()["path"] / "model",
        "Registry.champion_model_dir": reg.champion_model_dir,
        "champion_model_url": lambda: C.champion_model_url(
            str(reg.root), json.loads(Path(reg.layout.champion).read_text())),
    }
    outcome: dict[str, str] = {}
    for name, pointer in _tampered_pointers(tmp_path).items():
        _tamper(reg, pointer)
        seen = []
        for loader, load in loaders.items():
            try:
                got = load()
            except DataContractError as exc:
                assert exc.exit_code == 3 and CHAMPION in str(exc) and "refusing" in str(exc), str(exc)
                seen.append("refused")
            except Exception as exc:  # noqa: BLE001 - anything but the refusal is a finding
                seen.append(f"{loader}: {exc.__class__.__name__}: {exc}")
            else:
                seen.append(f"{loader}: followed to {os.path.realpath(got)}")
        outcome[name] = "refused" if set(seen) == {"refused"} else "; ".join(seen)
    return outcome


def test_tampered_champion_pointer_is_refused_by_every_loading_path(tmp_path):
    reg = _registry(tmp_path)
    assert (reg.champion_model_dir() / "saved_model" / "saved_model.pb").read_bytes() == b"champion"
    assert C.champion_model_url(str(reg.root), reg.champion()) == str(reg.root / "versions" / "v1" / "model")
    outcome = _followed_outside(reg, tmp_path)
    assert outcome == {name: "refused" for name in _tampered_pointers(tmp_path)}


def _publish_job():
    spec = importlib.util.spec_from_file_location("downpour_jobs_publish", ROOT / "jobs" / "publish.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_job_exits_3_on_a_tampered_champion(tmp_path, capsys):
    """jobs/publish.py (the retraining DAG's last task) refuses with exit 3, never prints the decoy."""
    reg = _registry(tmp_path)
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    card = {"model_version": "v1", "evaluation": {"gate": {"promoted": True, "registry": str(reg.root)}}}
    (out / "model" / "model_card.json").write_text(json.dumps(card))
    argv = ["--conf", str(ROOT / "conf" / "crm_telco.yaml"), "--set", f"output.path={out}", "--json"]
    job = _publish_job()
    assert job.main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["model_dir"] == str(reg.root / "versions/v1/model")
    _tamper(reg, "../elsewhere")
    assert job.main(argv) == 3
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert result["exit_code"] == 3 and "champion.json" in result["reason"]
    assert "model_dir" not in result and "status" in result and result["status"] == "error"


def test_a_normal_pointer_in_any_form_promote_writes_still_works(tmp_path):
    reg = _registry(tmp_path)
    R.enforce(reg, R.decide("roc_auc", 0.0, "20240601T000000Z-abcd1234", 0.9, "v1", 0.8),
              _model_dir(tmp_path / "src2", "v2") / "model", {})
    assert reg.champion()["path"] == "versions/20240601T000000Z-abcd1234"
    assert (reg.champion_model_dir() / "saved_model" / "saved_model.pb").read_bytes() == b"v2"
    # a registry reached through a symlink (e.g. a mount) is still "inside"
    os.symlink(reg.root, tmp_path / "reg-link")
    assert R.Registry(tmp_path / "reg-link").champion()["model_version"] == "20240601T000000Z-abcd1234"
    assert C.champion_model_url("s3a://bucket/reg", {"path": "versions/v9"}) == "s3a://bucket/reg/versions/v9/model"


def test_containment_check_is_what_refuses(tmp_path, monkeypatch):
    """With the check disabled, the same tampered pointers are followed out of the registry: the test
    above fails without the fix."""
    monkeypatch.setattr(C, "check_pointer", lambda root, pointer, where: pointer)
    reg = _registry(tmp_path)
    outcome = _followed_outside(reg, tmp_path)
    escaped = {n for n, o in outcome.items() if "followed to" in o and "elsewhere" in o}
    assert {"dotdot", "deep_dotdot", "absolute", "symlink"} <= escaped
    assert not any(o == "refused" for o in outcome.values())


def test_score_follows_only_a_contained_champion(tmp_path):
    from types import SimpleNamespace

    from downpour.pipelines.score import resolve_model_dir

    reg = _registry(tmp_path)
    cfg = SimpleNamespace(output=SimpleNamespace(path=str(tmp_path / "out")))
    assert resolve_model_dir(cfg, str(reg.root)) == str(reg.root / "versions" / "v1" / "model")
    os.symlink(tmp_path / "elsewhere", reg.root / "versions" / "escape")
    for pointer in _tampered_pointers(tmp_path).values():
        _tamper(reg, pointer)
        with pytest.raises(DataContractError, match="refusing"):
            resolve_model_dir(cfg, str(reg.root))
