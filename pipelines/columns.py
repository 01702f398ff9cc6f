"""Raw column names (any characters) -> safe internal names, so Spark SQL, Parquet and Keras agree."""

from __future__ import annotations

import re
from collections.abc import Iterable

_BAD = re.compile(r"[^0-9a-z]+")


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
