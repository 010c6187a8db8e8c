"""The configuration reference, generated from the settings' own fields, so that it cannot fall behind them.

``python -m daemon.configdoc`` rewrites the tables between the ``<!-- generated: NAME -->`` and
``<!-- end: NAME -->`` markers of docs/configuration.md; ``--check`` only says whether they are up to date (a test
runs it). Each table lists every field of one model: its key, its default, the values it takes, and its
description (the ``description`` of the pydantic field).
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from daemon.config import ENV_PREFIX, Rule, Settings
from daemon.hooks import Hook
from models.backends import BACKENDS

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HIDDEN = {"config_file"}  # set by the loader, not by users


def _type(annotation: Any) -> str:
    """A short, readable form of a field's type: the literal values where it has them."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:  # a constrained member of a union: the type, then its bounds
        marks = [x for m in annotation.__metadata__ for x in (m.metadata if isinstance(m, FieldInfo) else [m])]
        limits = [
            f"{k} {getattr(m, attr)}"
            for m in marks
            for k, attr in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt"))
            if getattr(m, attr, None) is not None
        ]
        return _type(args[0]) + (f" ({', '.join(limits)})" if limits else "")
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " \\| ".join(parts) + (" \\| unset" if type(None) in args else "")
    if origin is list:
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "table"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return annotation.__name__
        return {
            "str": "text",
            "int": "integer",
            "float": "number",
            "bool": "true/false",
            "PosixPath": "path",
            "Path": "path",
        }.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is None and field.default is PydanticUndefined:
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return f'`"{value}"`'
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | dict) and not value:
        return "`[]`" if isinstance(value, list) else "`{}`"
    if isinstance(value, list):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    return f"`{value}`"


def _bounds(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("max_length", "max length")):
            value = getattr(m, name, None)
            if value is not None:
                out.append(f"{sym} {value}")
    return f" ({', '.join(out)})" if out else ""


def table(model: type[BaseModel], env: bool = False) -> str:
    """Markdown: one row per field of ``model``."""
    head = "| key | default | values | meaning |\n| --- | --- | --- | --- |"
    rows = []
    for name, field in model.model_fields.items():
        if name in HIDDEN:
            continue
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        if env:
            meaning += f" `{ENV_PREFIX}{name.upper()}`"
        rows.append(f"| `{name}` | {_default(field)} | {_type(field.annotation)}{_bounds(field)} | {meaning} |")
    return "\n".join([head, *rows])


def sections() -> dict[str, str]:
    """The generated tables, by marker name."""
    out = {"settings": table(Settings, env=True), "rule": table(Rule), "hook": table(Hook)}
    for backend in BACKENDS:
        if backend.params.model_fields:
            out[f"params-{backend.id}"] = table(backend.params)
    return out


def render(text: str) -> str:
    """``text`` with every generated section replaced by its current table.

    Raises:
        ValueError: a section of :func:`sections` has no markers in ``text``.
    """
    for name, body in sections().items():
        pattern = re.compile(
            rf"(<!-- generated: {re.escape(name)} -->\n)(?:.*?\n)?(<!-- end: {re.escape(name)} -->)", re.S
        )
        if not pattern.search(text):
            raise ValueError(f"{DOC.name} has no <!-- generated: {name} --> ... <!-- end: {name} --> section")

        def fill(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + "\n" + m.group(2)

        text = pattern.sub(fill, text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is not up to date")
    args = ap.parse_args(argv)
    current = DOC.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{DOC} is out of date: run python -m daemon.configdoc", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
