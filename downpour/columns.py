"""Raw column names (any characters) -> safe internal names, so Spark SQL, Parquet and Keras agree.

The foundation owns them because every stage needs them: ``Config.names`` is the one mapping a run
uses, derived from the declared schema, so no stage computes or passes its own."""

from __future__ import annotations

import re
from collections.abc import Iterable

_BAD = re.compile(r"[^0-9a-z]+")

# Columns the pipeline derives; a raw column whose safe name collides gets a numeric suffix instead.
DERIVED = ("row_id", "label", "weight", "split")


def safe_name(raw: str) -> str:
    """``'Monthly Charges'`` -> ``'monthly_charges'``; ``'credit_limit_used(%)'`` -> ``'credit_limit_used'``."""
    name = _BAD.sub("_", raw.strip().lower()).strip("_") or "col"
    return f"c_{name}" if name[0].isdigit() else name


def internal_names(raw_names: Iterable[str]) -> dict[str, str]:
    """Map every raw name to a unique safe name (``a b`` and ``a-b`` become ``a_b`` and ``a_b_2``)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for raw in raw_names:
        base = safe_name(raw)
        name, i = base, 2
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        out[raw] = name
    return out


def column_names(schema: Iterable[str]) -> dict[str, str]:
    """Raw declared name -> safe internal name, never colliding with the derived columns."""
    declared = list(schema)
    reserved = {f"\x00{d}": d for d in DERIVED}
    names = internal_names([*reserved.values(), *declared])
    return {raw: names[raw] for raw in declared}
