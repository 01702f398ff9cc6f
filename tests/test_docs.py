"""The README's configuration reference is generated from the schema and must be current."""

from pathlib import Path

from downpour.docs import BEGIN, END, config_reference


def test_readme_config_reference_is_current():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == config_reference(), "run: .venv/bin/python -m downpour.docs"


def test_readme_benchmark_table_is_the_latest_run(tmp_path):
    """The README shows what `make bench` last measured, and a missed goal is labelled as such."""
    import json

    from benchmarks import run

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = text[text.index(run.BEGIN) + len(run.BEGIN): text.index(run.END)]
    latest = root / "benchmarks" / "results" / "latest.json"
    assert latest.exists(), "run: make bench"
    result = json.loads(latest.read_text())
    assert block.strip() == run.render_markdown(result).strip(), "run: make bench (or benchmarks.run --only ...)"
    assert set(run.GOALS) <= set(result["figures"])

    fake = {"figures": {"input_vs_raw_pyarrow": 0.3, "prepare_vs_bare_io": 1.5, "scoring_rows_per_s": 1000}}
    table = run.render_markdown(fake)
    assert "| 0.3 | - | >= 0.5 | **missed** |" in table and "| 1.5 | - | <= 5 | met |" in table
    assert "| 1,000 | - | report | reported |" in table and "not measured" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{run.BEGIN}\nold\n{run.END}\nb\n")
    run.update_readme(table, str(readme))
    assert readme.read_text() == f"a\n{run.BEGIN}\n{table}{run.END}\nb\n"


def test_every_test_the_guarantees_table_names_exists():
    """A guarantee is only as good as its test: every test the README names must be a real test."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    table = text[text.index("## Guarantees"): text.index("## Benchmarks")]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| guarantee")]
    assert len(rows) >= 15
    named = 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 3 and all(cells), row[:80]
        for ref in re.findall(r"`((?:tests/[\w/]+\.py::)?test_\w+)`", " ".join(cells[1:])):
            path, _, name = ref.rpartition("::") if "::" in ref else ("tests/test_guarantee_breaks.py", "", ref)
            source = (root / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{ref}: no such test in {path}"
            named += 1
    assert named >= 40
