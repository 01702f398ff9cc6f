"""Floors that only go down: every product module imports only its own floor or those below it.

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
FOUNDATION = {"downpour", "downpour.config", "downpour.errors", "downpour.logs", "downpour.spark",
              "downpour.storage", "downpour.fsutil", "downpour.champion"}
FRONT_DOOR = {"downpour.api", "downpour.cli", "downpour.__main__", "downpour.docs", "downpour.tracking"}
FOLDERS = {"features": 1, "pipelines": 2, "training": 3}
NAMES = {0: "foundation", 1: "features", 2: "pipelines", 3: "training", 4: "front door"}


def floor(module: str) -> int | None:
    """The floor of a product module (None: not a product module, e.g. numpy)."""
    top = module.split(".")[0]
    if top in FOLDERS:
        return FOLDERS[top]
    if top != "downpour":
        return None
    name = ".".join(module.split(".")[:2])
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
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    found = []
    for module, path in modules.items():
        here = floor(module)
        for line, target in imported(ast.parse(path.read_text(), str(path)), set(modules)):
            there = floor(target)
            if there is not None and there > here:
                found.append(f"{path.relative_to(root)}:{line}: {module} ({NAMES[here]}) imports {target} "
                             f"({NAMES[there]}), a floor above it")
    return found


def test_every_module_imports_only_its_floor_or_below():
    assert violations(ROOT) == []


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path):
    """The checker itself: a lazy import from pipelines/ up into training/, and one from the foundation
    up into pipelines/, are both reported; a downward one is not."""
    (tmp_path / "downpour").mkdir()
    (tmp_path / "downpour" / "__init__.py").write_text("")
    for folder, text in {
        "pipelines": "def f():\n    from training.registry import Registry\n    return Registry\n",
        "training": "from pipelines import score\n",
    }.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
        (tmp_path / folder / "m.py").write_text(text)
    (tmp_path / "downpour" / "config.py").write_text("from downpour import storage\nimport pipelines.m\n")
    (tmp_path / "downpour" / "storage.py").write_text("")
    (tmp_path / "features").mkdir()
    found = violations(tmp_path)
    assert len(found) == 2, found
    assert "pipelines/m.py:2: pipelines.m (pipelines) imports training.registry (training)" in found[1]
    assert found[0].startswith("downpour/config.py:2:") and "imports pipelines.m (pipelines)" in found[0]
