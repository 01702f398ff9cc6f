"""Generate the configuration reference (README) from the config schema, so the docs cannot drift."""

from __future__ import annotations

from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from downpour.config import Config

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")
    parts = [_type_name(a) if not isinstance(a, str) else a for a in get_args(annotation)]
    name = getattr(origin, "__name__", str(origin)).replace("typing.", "")
    if name in ("Union", "UnionType"):
        return " | ".join(parts)
    return f"{name}[{', '.join(parts)}]"


def _rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(_rows(ann, key + "."))
            continue
        if field.is_required():
            default = "**required**"
        elif field.default_factory is not None:
            default = f"`{field.default_factory()!r}`"
        elif field.default is PydanticUndefined:
            default = ""
        else:
            default = f"`{field.default!r}`"
        doc = (field.description or "").replace("|", "\\|")
        rows.append((key, _type_name(ann).replace("|", "\\|"), default.replace("|", "\\|"), doc))
    return rows


def config_reference() -> str:
    """A Markdown table of every config key, its type and default."""
    lines = [BEGIN, "| key | type | default |", "| --- | --- | --- |"]
    for key, typ, default, _doc in _rows(Config):
        lines.append(f"| `{key}` | `{typ}` | {default} |")
    lines.append(END)
    return "\n".join(lines)


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the reference block in the README; returns True when it changed."""
    text = open(path).read()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + config_reference() + text[end:]
    if new != text:
        open(path, "w").write(new)
    return new != text


if __name__ == "__main__":
    print("updated" if update_readme() else "up to date")
