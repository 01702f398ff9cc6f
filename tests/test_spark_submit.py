"""spark-submit: `make dist`'s artifacts, the job scripts, and get_spark under the real spark-submit binary."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"
STAGES = ("prepare", "train", "evaluate", "score")
# The tiny Telco run: the real table, one epoch.
TINY = ["training.epochs=1", "training.workers=2", "evaluation.baseline=false"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    """The test's environment minus the pytest session's own Spark gateway (spark-submit makes its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_GATEWAY")}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    env.pop("SPARK_HOME", None)  # the venv's PySpark is the Spark to use
    return env


def submit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    cmd = [str(SPARK_SUBMIT), "--driver-memory", "1g", "--conf", "spark.ui.enabled=false", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _load_script("build_dist").build(out)
    return out


def test_dist_zip_jobs_conf_and_note(dist):
    with zipfile.ZipFile(dist / "downpour-pyfiles.zip") as zf:
        names = set(zf.namelist())
    for module in ("downpour/cli.py", "downpour/api.py", "downpour/pipelines/prepare.py",
                   "downpour/features/state.py", "downpour/training/train.py", "downpour/training/evaluate.py"):
        assert module in names, module
    assert {n.split("/")[0] for n in names} == {"downpour"}  # the wheel's layout: one top-level package
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {p.name for p in (dist / "jobs").glob("*.py")} >= {f"{s}.py" for s in STAGES}
    assert (dist / "conf" / "crm_telco.yaml").is_file()
    note = (dist / "SHIPPING.txt").read_text()
    assert "--archives" in note and "spark.pyspark.python" in note and "conda pack" in note


@pytest.mark.parametrize("stage", STAGES)
def test_job_scripts_call_the_cli_with_their_stage(stage):
    source = (ROOT / "jobs" / f"{stage}.py").read_text()
    compile(source, f"jobs/{stage}.py", "exec")
    assert "from downpour.cli import main" in source and f'main(["{stage}"' in source


PROBE = """
import json, sys
from downpour.config import load_config
from downpour.spark import get_spark
import downpour
spark = get_spark(load_config(sys.argv[1]))
sc = spark.sparkContext
print("PROBE " + json.dumps({"master": sc.master, "app": sc.appName, "downpour": downpour.__file__,
                             "shuffle": spark.conf.get("spark.sql.shuffle.partitions")}))
"""


@pytest.fixture(scope="module")
def probe(dist, tmp_path_factory) -> dict[str, str]:
    """What get_spark sees when spark-submit launched it with --master/--name/--conf and --py-files."""
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE)
    proc = submit("--master", "local[1]", "--name", "probe-app", "--conf", "spark.sql.shuffle.partitions=3",
                  "--py-files", str(dist / "downpour-pyfiles.zip"), str(script),
                  str(ROOT / "conf" / "crm_telco.yaml"), timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE "):])


def test_get_spark_keeps_the_master_spark_submit_gave(probe):
    assert probe["master"] == "local[1]"


def test_py_files_zip_is_what_the_job_imports(probe):
    assert "downpour-pyfiles.zip" in probe["downpour"]


def test_get_spark_keeps_spark_submit_settings(probe):
    """`spark-submit --name/--conf` are the user's: Downpour's defaults must not override them."""
    assert probe["app"] == "probe-app"
    assert probe["shuffle"] == "3"


def test_job_exit_code_passes_through_spark_submit():
    proc = submit("--master", "local[1]", str(ROOT / "jobs" / "prepare.py"),
                  "--conf", str(ROOT / "conf" / "crm_telco.yaml"), "--set", "training.workers=0", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr  # spark-submit relays the Python driver's stderr on its stdout
    assert "downpour prepare: training.workers" in output and "Traceback" not in output


@pytest.mark.slow
def test_prepare_and_train_through_spark_submit(dist, telco_path, tmp_path):
    out = tmp_path / "out"
    args = ["--conf", str(ROOT / "conf" / "crm_telco.yaml"), "--set", f"input.path={telco_path}",
            "--set", f"output.path={out}", *[x for o in TINY for x in ("--set", o)]]
    common = ["--master", "local[2]", "--py-files", str(dist / "downpour-pyfiles.zip")]

    prep = submit(*common, str(dist / "jobs" / "prepare.py"), *args)
    assert prep.returncode == 0, prep.stderr[-4000:]
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["input"] == 7043 and c["input"] == c["clean"] + c["quarantined"] + c["duplicates"]
    assert sum(s["rows"] for s in manifest["splits"].values()) == c["clean"]

    train = submit(*common, str(dist / "jobs" / "train.py"), *args)
    assert train.returncode == 0, train.stderr[-4000:]
    card = json.loads((out / "model" / "model_card.json").read_text())
    assert card["training"]["workers"] == 2 and card["training"]["epochs_completed"] == 1
    assert card["data_version"] == manifest["data_version"]
    assert (out / "model" / "saved_model" / "saved_model.pb").is_file()


def test_gpu_discovery_script_reports_spark_resource_json(tmp_path):
    script = str(ROOT / "scripts" / "get_gpus_resources.sh")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")  # what --query-gpu=index prints
    (fake_bin / "nvidia-smi").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([shutil.which("bash"), script], capture_output=True, text=True, timeout=30,
                              env={**base, **env})

    listed = run(PATH=f"{fake_bin}:{base['PATH']}")
    assert json.loads(listed.stdout) == {"name": "gpu", "addresses": ["0", "1"]}
    narrowed = run(CUDA_VISIBLE_DEVICES="3")  # the cluster manager's choice wins
    assert json.loads(narrowed.stdout) == {"name": "gpu", "addresses": ["3"]}
    (tmp_path / "empty").mkdir()
    none = run(PATH=str(tmp_path / "empty"))  # no nvidia-smi, no CUDA_VISIBLE_DEVICES
    assert none.returncode == 1 and "no GPU" in none.stderr
