"""Write docs/configuration.md from the config schema's own field descriptions.

    python scripts/config_reference.py          # rewrite docs/configuration.md
    python scripts/config_reference.py --check  # exit 1 if the committed page is out of date

The schema (src/lowlm/config.py and the section modules it imports) is the one source: a field
added there appears here with its type, default and description, and a test fails while the
page is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lowlm.config import LowlmConfig

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = """# Configuration reference

One YAML file describes one run; every command takes it (`lowlm <command> CONFIG
[--set section.key=value ...]`) and `lowlm validate CONFIG` prints it resolved, every default
filled in. Unknown keys are errors that name the nearest valid key.

This page is generated from the field descriptions of the config schema (`src/lowlm/config.py`
and the section modules it imports) by `python scripts/config_reference.py`; a test fails when
it is out of date.
"""


def _nested_model(annotation: object) -> type[BaseModel] | None:
    """The pydantic model a field holds directly or as list items, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        for argument in typing.get_args(annotation):
            found = _nested_model(argument)
            if found is not None:
                return found
    return None


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # e.g. config.PathText: the type, its validators aside
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(str(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(argument) for argument in typing.get_args(annotation))
    if origin is not None:
        arguments = ", ".join(_type_name(argument) for argument in typing.get_args(annotation))
        return f"{origin.__name__}[{arguments}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else _yaml(value)
    if field.default is PydanticUndefined:
        return "required"
    return _yaml(field.default)


def _yaml(value: object) -> str:
    """A default as the user writes it in the YAML file (null, true, [a, b])."""
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        nested = _nested_model(field.annotation)
        description = (field.description or "").replace("|", "\\|")
        if nested is not None:
            is_list = typing.get_origin(field.annotation) is list
            if description:
                rows.append(f"| `{key}` | {'list' if is_list else 'section'} | | {description} |")
            rows += _rows(nested, f"{key}[]" if is_list else key)
            continue
        type_name = _type_name(field.annotation)
        rows.append(f"| `{key}` | {type_name} | {_default(field)} | {description} |")
    return rows


def render() -> str:
    parts = [HEADER]
    for section, field in LowlmConfig.model_fields.items():
        parts.append(f"## `{section}`\n")
        parts.append("| key | type | default | what it does |\n|---|---|---|---|")
        parts.append("\n".join(_rows(field.annotation, section)) + "\n")
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the page is stale")
    args = parser.parse_args()
    page = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != page:
            print("error: docs/configuration.md is stale: run python scripts/config_reference.py")
            return 1
        return 0
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
