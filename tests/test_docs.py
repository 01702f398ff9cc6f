"""The README's configuration reference is generated from the schema and must be current."""

from pathlib import Path

from downpour.docs import BEGIN, END, config_reference


def test_readme_config_reference_is_current():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == config_reference(), "run: .venv/bin/python -m downpour.docs"
