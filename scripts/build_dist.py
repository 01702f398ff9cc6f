"""Assemble what a Spark cluster needs next to the wheel that `make dist` builds.

    python scripts/build_dist.py dist

writes, under the given folder:

* ``downpour-pyfiles.zip``: the ``downpour`` package (with the folders ``pipelines``, ``features``
  and ``training`` inside it as ``downpour.pipelines``, ..., as the wheel installs them) for
  ``spark-submit --py-files``; the third-party stack (TensorFlow, Horovod,
  petastorm, ...) must already be on the executors (cluster image, or a packed environment shipped
  with ``--archives``, see README "Running on a cluster").
* ``jobs/``: the thin entry scripts spark-submit runs (one per stage).
* ``conf/``: the example configs, to ship with ``--files`` or copy next to the jobs.
* ``SHIPPING.txt``: how to ship the Python environment with ``--archives``.

Pure standard library, so it runs with any Python 3.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder in the repository -> its place in the zip (the wheel's layout: pyproject's package-dir)
PACKAGES = {"downpour": "downpour", "pipelines": "downpour/pipelines", "features": "downpour/features",
            "training": "downpour/training"}
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = {".pyc", ".pyo"}

SHIPPING = """\
Shipping the Python environment to the executors (spark-submit --archives)
==========================================================================
Executors need the pinned stack (Python 3.11, TensorFlow 2.15, Horovod 0.28.1 built with gloo,
petastorm, pyarrow 10). The downpour packages themselves travel with --py-files downpour-pyfiles.zip
(or install the wheel into the environment). venv-pack is not part of the toolchain; use one of:

1. A virtual environment packed with tar (nodes must have Python 3.11 at the same path as the
   machine that built it, e.g. the same image: a venv links to its base interpreter):
     python3.11 -m venv --copies /opt/downpour-env
     /opt/downpour-env/bin/pip install -c constraints.txt tensorflow-cpu==2.15.1
     HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \\
       /opt/downpour-env/bin/pip install --no-build-isolation -c constraints.txt "horovod[spark]==0.28.1"
     /opt/downpour-env/bin/pip install -c constraints.txt dist/downpour-*.whl
     tar -C /opt/downpour-env -czf downpour-env.tar.gz .
   then
     spark-submit --archives downpour-env.tar.gz#env \\
       --conf spark.pyspark.python=./env/bin/python ...

2. conda-pack (ships the interpreter too, so the nodes need no Python at all):
     conda create -p /opt/downpour-conda python=3.11 && conda activate /opt/downpour-conda
     (the same pip installs as above)
     conda pack -p /opt/downpour-conda -o downpour-env.tar.gz
   and the same --archives / spark.pyspark.python settings.

3. Kubernetes: bake the environment into the Spark image (spark.kubernetes.container.image) and
   set spark.pyspark.python to its interpreter; no archive needed.

In YARN cluster mode also set spark.yarn.appMasterEnv.PYSPARK_PYTHON=./env/bin/python.
"""


def _package_files(root: Path) -> list[tuple[Path, str]]:
    """(file, its name in the zip) for every file of the project's packages."""
    files = []
    for folder, arc in PACKAGES.items():
        base = root / folder
        if not (base / "__init__.py").is_file():
            raise SystemExit(f"build_dist: {base} is not a package (no __init__.py)")
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.suffix not in SKIP_SUFFIXES and not SKIP_DIRS & set(p.parts):
                files.append((p, f"{arc}/{p.relative_to(base).as_posix()}"))
    return files


def build_pyfiles_zip(dest: Path, root: Path = ROOT) -> Path:
    """Zip the project's packages in the wheel's layout (importable from the zip)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p, arc in _package_files(root):
            zf.write(p, arc)
    tmp.replace(dest)
    return dest


def build(out: Path, root: Path = ROOT) -> list[Path]:
    """Write the zip, the job scripts, the configs and the shipping note under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [build_pyfiles_zip(out / "downpour-pyfiles.zip", root)]
    for folder, pattern in (("jobs", "*.py"), ("conf", "*.yaml")):
        target = out / folder
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for p in sorted((root / folder).glob(pattern)):
            written.append(Path(shutil.copy2(p, target / p.name)))
    note = out / "SHIPPING.txt"
    note.write_text(SHIPPING)
    written.append(note)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "dist"), help="output folder (default: dist)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    written = build(out)
    for p in written:
        print(p.relative_to(out.parent) if p.is_relative_to(out.parent) else p)
    print(f"\nShip the Python environment with --archives: see {out / 'SHIPPING.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
