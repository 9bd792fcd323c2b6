"""The markdown reference of every config field, built from the dataclasses in `schema.py`.

Nothing here is written by hand: sections are the fields of `Config`, each section's text is its
class docstring, and each field's text is the string literal right under it in the source (read
with `ast`, since Python keeps no attribute docstrings at run time). `docs/config.md` is this
output, and a test keeps the two equal.

    scaletrain config reference > docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

from scaletrain.config.schema import Config

HEADER = """\
# Config reference

Generated from `scaletrain/config/schema.py` by `scaletrain config reference`; do not edit by
hand (a test compares this file with the command's output).

A run file is YAML with one mapping per section below; a field left out takes its default.
`model:` may also name a model file: `model: small` or `model: {base: small, num_layers: 8}`
reads `../models/small.yaml` relative to the run file's folder, then `configs/models/small.yaml`
under the current directory; a name ending in `.yaml` is a path (relative to the run file's
folder or the current directory).
Any field can be overridden on the command line as `section.field=value`, with the value read
as YAML (`parallel.tp=2`, `data.paths=[data/a,data/b]`, `model.vocab_size=null`).
`scaletrain config show` prints the resolved config; `scaletrain config check --world-size N`
also applies the rules that tie fields together (see `scaletrain/config/checks.py`).
"""


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring} of a dataclass, in source order."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def section_classes() -> dict[str, type]:
    """{section name: its dataclass}, in the order of `Config`."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def default_value(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"config field {f.name!r} has no default")


def format_default(value: Any) -> str:
    """A default as it is written in YAML (the form `scaletrain config show` prints)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()


def format_type(hint: Any) -> str:
    """A type as a YAML author reads it: `int | null`, `"fp32" | "bf16" | "fp16"`, `list[str]`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(format_type(a) for a in args)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin is list:
        return f"list[{format_type(args[0])}]"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _cell(text: str, code: bool = False) -> str:
    """One markdown table cell on one line. Pipes are escaped (GFM does so in code spans too);
    in prose `<` is escaped as well, so `<run_dir>` is not taken for an HTML tag."""
    text = " ".join(text.split()).replace("|", "\\|")
    return f"`{text}`" if code else text.replace("<", "\\<")


def config_reference() -> str:
    """The whole reference as markdown (what `scaletrain config reference` prints)."""
    section_docs = field_docs(Config)
    sections = section_classes()
    out = [HEADER]
    out.append("| section | contents |\n|---|---|")
    for name in sections:
        out.append(f"| [`{name}`](#{name}) | {_cell(section_docs.get(name, ''))} |")
    out.append("")
    for name, cls in sections.items():
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        out.append(f"## {name}\n")
        out.append(inspect.cleandoc(cls.__doc__ or "") + "\n")
        out.append("| field | type | default | description |\n|---|---|---|---|")
        for f in dataclasses.fields(cls):
            out.append(
                f"| `{name}.{f.name}` | {_cell(format_type(hints[f.name]), code=True)} "
                f"| {_cell(format_default(default_value(f)), code=True)} "
                f"| {_cell(docs.get(f.name, ''))} |"
            )
        out.append("")
    return "\n".join(out)
