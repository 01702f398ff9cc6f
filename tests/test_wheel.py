"""The wheel users install: one top-level package, requirements as ranges, and an install that leaves the
cluster's own stack (its PySpark above all) in place.

The install test builds what a Databricks ML runtime or a cluster image looks like: a fresh venv with
its own PySpark (3.5.2, not our 3.5.3) and the rest of the stack (TensorFlow, Horovod, petastorm, ...)
already there, then installs the wheel with ``--no-index``, so pip can fetch nothing: every
requirement must be met by what the environment has, and nothing it has may be replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_PYSPARK = "3.5.2"  # another 3.5.x than constraints.txt's, as a runtime would have


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("downpour-*.whl")
    return path


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
            if line.startswith("Requires-Dist:")]


def test_one_top_level_package_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {n.split("/")[0] for n in names} == {"downpour", "downpour-0.1.0.dist-info"}
    assert {"downpour/cli.py", "downpour/pipelines/prepare.py", "downpour/features/state.py",
            "downpour/training/train.py"} <= names
    assert "downpour = downpour.cli:main" in entry_points


def test_requirements_are_ranges_spark_and_tensorflow_only_in_extras(wheel):
    base = [r for r in _requirements(wheel) if r.marker is None or "extra" not in str(r.marker)]
    assert not [r for r in base if any(s.operator == "==" for s in r.specifier)], base
    assert not {r.name for r in base} & {"pyspark", "tensorflow", "tensorflow-cpu"}, base
    extras = {str(r.marker).split('"')[1]: r for r in _requirements(wheel) if r.marker and "extra" in str(r.marker)}
    assert extras["spark"].name == "pyspark" and extras["spark"].specifier.contains(CLUSTER_PYSPARK)


def test_the_pinned_stack_satisfies_the_ranges(wheel):
    """constraints.txt's environment (this venv, read from its own metadata) meets every base requirement."""
    unmet = []
    for r in _requirements(wheel):
        if r.marker is not None and not r.marker.evaluate({"extra": "spark"}):
            continue
        version = metadata.version(r.name)
        if not r.specifier.contains(version, prereleases=True):
            unmet.append(f"{r} (have {version})")
    assert unmet == []


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory) -> Path:
    """A venv with its own PySpark and, through a .pth, the rest of the stack (no downpour in it)."""
    env = tmp_path_factory.mktemp("cluster") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    made = _run([base, "-m", "venv", str(env)])
    assert made.returncode == 0, made.stderr
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    got = _run([*pip, "--no-deps", f"pyspark=={CLUSTER_PYSPARK}", "py4j==0.10.9.7"])
    assert got.returncode == 0, got.stderr[-2000:]
    # The stack, minus our own package and PySpark: a folder of links to this venv's site-packages.
    ours = Path(next(p for p in sys.path if p.endswith("site-packages")))
    stack = env.parent / "stack"
    stack.mkdir()
    for entry in ours.iterdir():
        if not entry.name.lower().startswith(("downpour", "__editable__", "pyspark", "py4j")):
            (stack / entry.name).symlink_to(entry)
    (site,) = (env / "lib").glob("python3.*/site-packages")
    (site / "zz_stack.pth").write_text(f"{stack}\n")
    return env


def _versions(env: Path) -> dict[str, str]:
    code = "import json, pyspark, pandas, numpy, pyarrow; print(json.dumps({m.__name__: m.__version__ " \
           "for m in (pyspark, pandas, numpy, pyarrow)}))"
    proc = _run([str(env / "bin" / "python"), "-c", code], cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _pinned_copy(wheel: Path, requirement: str, dest: Path) -> Path:
    """The wheel with one more Requires-Dist line (the old wheel pinned ``pyspark==3.5.3``)."""
    dest.mkdir()
    copy = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(copy, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".dist-info/METADATA"):
                data = data.replace(b"Requires-Dist:", f"Requires-Dist: {requirement}\nRequires-Dist:".encode(), 1)
            dst.writestr(item, data)
    return copy


@pytest.mark.slow
def test_a_wheel_that_pins_pyspark_is_refused(wheel, cluster_env, tmp_path):
    """Companion: a wheel requiring another PySpark than the cluster's cannot install here, so the test
    below would fail (pip would have to replace the cluster's PySpark, and it may fetch nothing)."""
    pinned = _pinned_copy(wheel, "pyspark==3.5.3", tmp_path / "pinned")
    proc = _run([str(cluster_env / "bin" / "python"), "-m", "pip", "install", "--no-index",
                 "--disable-pip-version-check", str(pinned)])
    assert proc.returncode != 0 and "pyspark==3.5.3" in proc.stderr, proc.stdout + proc.stderr
    assert _versions(cluster_env)["pyspark"] == CLUSTER_PYSPARK


@pytest.mark.slow
def test_install_leaves_the_clusters_pyspark_and_stack_in_place(wheel, cluster_env, telco_path, tmp_path):
    before = _versions(cluster_env)
    assert before["pyspark"] == CLUSTER_PYSPARK
    python = str(cluster_env / "bin" / "python")
    for spec in (str(wheel), f"downpour[spark] @ {wheel.as_uri()}"):
        proc = _run([python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", spec])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Uninstalling" not in proc.stdout, proc.stdout
    assert _versions(cluster_env) == before

    # The package comes from the venv, not from a checkout, and the CLI runs a stage with that PySpark.
    where = _run([python, "-c", "import downpour.pipelines.prepare as m; print(m.__file__)"], cwd="/")
    assert where.returncode == 0 and str(cluster_env) in where.stdout, where.stdout + where.stderr
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSPARK_") and k != "SPARK_HOME"}
    env.update(PYSPARK_PYTHON=python, DOWNPOUR_PII_SALT="wheel-test-salt")
    proc = _run([str(cluster_env / "bin" / "downpour"), "prepare", "--conf", str(ROOT / "conf" / "crm_telco.yaml"),
                 "--set", f"input.path={telco_path}", "--set", f"output.path={out}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads((out / "prepared" / "manifest.json").read_text())["counts"]
    assert counts["input"] == 7043 and counts["input"] == counts["clean"] + counts["quarantined"] + counts["duplicates"]
