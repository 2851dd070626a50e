"""The configuration reference (docs/configuration.md), generated from the schema's field descriptions.

The schema is the one place a key's type, default and meaning are written; this renders it as Markdown so the
docs cannot drift from it (``tests/test_docs.py`` fails when the committed file is stale). Regenerate with::

    make docs        # or: python -m aigc.config.reference > docs/configuration.md
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from aigc.config.schema import PlatformConfig, SourceConfig

__all__ = ["render_reference"]

_HEADER = """\
# Configuration reference

<!-- Generated from platform/aigc/config/schema.py and serving.py by `make docs`: edit the field descriptions
there, not this file. -->

One YAML file describes a run (`configs/demo.yaml` is commented line by line). Every command takes
`--config FILE` and any number of `section.key=value` overrides (values are YAML; text fields are taken exactly
as typed); `aigc config --config FILE` prints the resolved config, every key. An unknown key or a bad value fails
before any Ray work, naming the key and the reason, with exit status 2. Relative paths are made absolute once,
when the config loads.

```bash
.venv/bin/aigc config --config configs/demo.yaml train.lr=1e-3     # every key, resolved
make docs                                                           # regenerate this file, or:
.venv/bin/python -m aigc.config.reference > docs/configuration.md
```
"""


def render_reference() -> str:
    """The whole reference: the top-level keys, then one table per section (nested sections after their parent)."""
    parts = [_HEADER]
    top = {n: f for n, f in PlatformConfig.model_fields.items() if _section_of(f) is None}
    parts.append(_table("Top level", None, "", top))
    for name, field in PlatformConfig.model_fields.items():
        section = _section_of(field)
        if section is not None:
            parts.extend(_section(f"{name}", section, field.description))
    parts.append(
        _table(
            "`data.path` entries",
            "Each entry of `data.path` given as a list is a path or a mapping with these keys (a dataset of a "
            "mixture); see docs/data.md.",
            "",
            SourceConfig.model_fields,
        )
    )
    return "\n".join(parts)


def _section(prefix: str, model: type[BaseModel], description: str | None) -> list[str]:
    """The table of one section's own keys, then its nested sections'."""
    doc = _markdown(model.__doc__ or "")
    intro = (
        doc if description and doc.startswith(description.rstrip(".")) else " ".join(p for p in (description, doc) if p)
    )
    own = {n: f for n, f in model.model_fields.items() if _section_of(f) is None}
    out = [_table(f"`{prefix}`", intro or None, f"{prefix}.", own)]
    for name, field in model.model_fields.items():
        nested = _section_of(field)
        if nested is not None:
            out.extend(_section(f"{prefix}.{name}", nested, field.description))
    return out


def _table(title: str, intro: str | None, prefix: str, fields: dict[str, FieldInfo]) -> str:
    lines = [f"## {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in fields.items():
        cells = [f"`{prefix}{name}`", _type(field.annotation), _default(field), field.description or ""]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _section_of(field: FieldInfo) -> type[BaseModel] | None:
    a = field.annotation
    return a if isinstance(a, type) and issubclass(a, BaseModel) else None


def _type(a: Any) -> str:
    """A short, readable type: ``int``, ``str | unset``, ``lora | qlora | full``, ``list[str]``."""
    origin = typing.get_origin(a)
    if a is type(None):
        return "unset"
    if origin is typing.Annotated:
        return _type(typing.get_args(a)[0])
    if origin is typing.Literal:
        return " | ".join(str(v) for v in typing.get_args(a))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(_type(x) for x in typing.get_args(a)))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(x) for x in typing.get_args(a))}]"
    if a is SourceConfig:
        return "{path, format, columns, weight}"
    return getattr(a, "__name__", str(a))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict | list) and not value:
        return "`{}`" if isinstance(value, dict) else "`[]`"
    return f"`{value}`"


def _markdown(docstring: str) -> str:
    """A class docstring as one Markdown paragraph: ``x`` and :mod:`x` become `x`."""
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", " ".join(docstring.split()))
    return text.replace("``", "`")


def _cell(text: str) -> str:
    """Table-safe text: a ``|`` would end the cell, a newline the row, and ``<run>`` outside a code span would be
    read as an HTML tag and vanish."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts))


if __name__ == "__main__":
    print(render_reference(), end="")
