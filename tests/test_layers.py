"""Floors that only go down: every product module imports only its own floor or those below it.

The folders pipelines/, features/ and training/ install as ``downpour.pipelines``, ``downpour.features``
and ``downpour.training`` (pyproject's package-dir), so the wheel puts nothing generic at top level.
A bare ``import pipelines`` would still work from a checkout (its root is on ``sys.path``) and break
from the wheel, so it fails here.

From the bottom: the foundation (config, errors, logs, spark, storage and the other small owners in
downpour/), then features/, pipelines/ (data preparation, scoring, serving), training/ (training,
evaluation, the registry), and on top the front door (CLI, API, MLflow tracking, docs; jobs/, dags/
and notebooks/ sit above everything and are not checked). Imports inside functions count: a lazy
import is still a dependency. A downpour/ module that is on no floor fails the test, so a new module
must be placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION = {"downpour", "downpour.config", "downpour.columns", "downpour.errors", "downpour.logs", "downpour.spark",
              "downpour.storage", "downpour.fsutil", "downpour.champion", "downpour.layout",
              "downpour.artifact"}
FRONT_DOOR = {"downpour.api", "downpour.cli", "downpour.__main__", "downpour.docs", "downpour.tracking"}
FOLDERS = {"features": 1, "pipelines": 2, "training": 3}
NAMES = {0: "foundation", 1: "features", 2: "pipelines", 3: "training", 4: "front door"}


def installed_name(path: Path, root: Path) -> str:
    """The module's name in the wheel: ``pipelines/score.py`` -> ``downpour.pipelines.score``."""
    name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    return f"downpour.{name}" if name.split(".")[0] in FOLDERS else name


def floor(module: str) -> int | None:
    """The floor of a product module (None: not a product module, e.g. numpy)."""
    parts = module.split(".")
    if parts[0] != "downpour":
        return None
    if len(parts) > 1 and parts[1] in FOLDERS:
        return FOLDERS[parts[1]]
    name = ".".join(parts[:2])
    if name in FOUNDATION:
        return 0
    if name in FRONT_DOOR:
        return 4
    raise AssertionError(f"{module}: on no floor; add it to FOUNDATION or FRONT_DOOR in {__file__}")


def imported(tree: ast.AST, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``tree``, wherever it sits."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from downpour import tracking` imports the module downpour.tracking
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            out += [(node.lineno, m) for m in subs] or [(node.lineno, node.module)]
    return out


def violations(root: Path) -> list[str]:
    files = [p for d in ("downpour", *FOLDERS) for p in sorted((root / d).rglob("*.py"))]
    modules = {installed_name(p, root): p for p in files}
    found = []
    for module, path in modules.items():
        here = floor(module)
        for line, target in imported(ast.parse(path.read_text(), str(path)), set(modules)):
            if target.split(".")[0] in FOLDERS:
                found.append(f"{path.relative_to(root)}:{line}: {module} imports {target}, a name that only "
                             f"exists in a checkout: import downpour.{target}")
                continue
            there = floor(target)
            if there is not None and there > here:
                found.append(f"{path.relative_to(root)}:{line}: {module} ({NAMES[here]}) imports {target} "
                             f"({NAMES[there]}), a floor above it")
    return found


def everywhere_bare_imports(root: Path) -> list[str]:
    """Bare ``pipelines``/``features``/``training`` imports in any Python file of the repository."""
    found = []
    for d in ("downpour", *FOLDERS, "jobs", "dags", "notebooks", "benchmarks", "scripts", "tests"):
        for path in sorted((root / d).rglob("*.py")):
            for line, target in imported(ast.parse(path.read_text(), str(path)), set()):
                if target.split(".")[0] in FOLDERS:
                    found.append(f"{path.relative_to(root)}:{line}: {target}")
    return found


def test_every_module_imports_only_its_floor_or_below():
    assert violations(ROOT) == []


def test_nothing_imports_a_folder_by_its_checkout_name():
    """jobs/, dags/, the notebook, benchmarks and tests run from the wheel too: ``downpour.<folder>`` only."""
    assert everywhere_bare_imports(ROOT) == []


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path):
    """The checker itself: a lazy import from pipelines/ up into training/, and one from the foundation
    up into pipelines/, are both reported; a downward one is not; a bare ``import features.m`` is reported
    whatever its floor."""
    (tmp_path / "downpour").mkdir()
    (tmp_path / "downpour" / "__init__.py").write_text("")
    for folder, text in {
        "pipelines": "def f():\n    from downpour.training.registry import Registry\n    return Registry\n",
        "training": "from downpour.pipelines import score\nimport features.m\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
        (tmp_path / folder / "m.py").write_text(text)
    (tmp_path / "downpour" / "config.py").write_text("from downpour import storage\nimport downpour.pipelines.m\n")
    (tmp_path / "downpour" / "storage.py").write_text("")
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "m.py").write_text("")
    found = violations(tmp_path)
    assert len(found) == 3, found
    assert found[0].startswith("downpour/config.py:2:") and "imports downpour.pipelines.m (pipelines)" in found[0]
    assert "pipelines/m.py:2: downpour.pipelines.m (pipelines) imports downpour.training.registry" in found[1]
    assert found[2].startswith("training/m.py:2:") and "imports features.m, a name that only exists" in found[2]
    assert everywhere_bare_imports(tmp_path) == ["training/m.py:2: features.m"]


MAX_LINES = 450


def long_without_a_reason(root: Path) -> list[str]:
    """Product modules over MAX_LINES lines whose docstring does not say why they are long ("Long")."""
    found = []
    for d in ("downpour", *FOLDERS):
        for path in sorted((root / d).rglob("*.py")):
            text = path.read_text()
            doc = ast.get_docstring(ast.parse(text)) or ""
            if len(text.splitlines()) > MAX_LINES and "Long" not in doc:
                found.append(str(path.relative_to(root)))
    return found


def test_a_long_module_says_why_at_its_top():
    assert long_without_a_reason(ROOT) == []


def test_a_long_module_without_a_reason_is_reported(tmp_path):
    """Companion: the same length passes only with the reason in the docstring."""
    (tmp_path / "training").mkdir()
    body = "x = 1\n" * (MAX_LINES + 1)
    (tmp_path / "training" / "big.py").write_text('"""Does things."""\n' + body)
    (tmp_path / "training" / "ok.py").write_text('"""Does things.\n\nLong: one contract."""\n' + body)
    assert long_without_a_reason(tmp_path) == ["training/big.py"]
