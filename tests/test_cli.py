"""CLI frame: --help everywhere, exit codes of the contract, no traceback for user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from downpour.cli import main

COMMANDS = ["generate", "prepare", "train", "evaluate", "score", "run"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "downpour", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_on_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0
    assert cmd in capsys.readouterr().out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2


def test_bad_config_exits_2_naming_key(conf_dir, capsys):
    code = main(["prepare", "--conf", str(conf_dir / "crm_telco.yaml"), "--set", "training.workers=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "training.workers" in err and "Traceback" not in err


def test_missing_config_file_exits_2(capsys):
    assert main(["train", "--conf", "/nonexistent/x.yaml"]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_subprocess_no_traceback(conf_dir):
    proc = _run("prepare", "--conf", str(conf_dir / "fraud.yaml"), "--set", "split.fractions.train=2")
    assert proc.returncode == 2
    assert "split.fractions" in proc.stderr
    assert "Traceback" not in proc.stderr
