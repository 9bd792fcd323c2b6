"""The config reference: every field documented, every field and default in it, doc up to date."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scaletrain.cli import main
from scaletrain.config.reference import (
    config_reference,
    default_value,
    field_docs,
    format_default,
    section_classes,
)
from scaletrain.config.schema import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
SECTIONS = section_classes()
FIELDS = [(name, f) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _ids(fields: list[tuple[str, dataclasses.Field]]) -> list[str]:
    return [f"{name}.{f.name}" for name, f in fields]


@pytest.fixture(scope="module")
def reference() -> str:
    return config_reference()


def _row(reference: str, path: str) -> str:
    rows = [line for line in reference.splitlines() if line.startswith(f"| `{path}` |")]
    assert len(rows) == 1, f"{path}: {len(rows)} rows in the reference"
    return rows[0]


def test_every_section_and_field_has_a_docstring() -> None:
    """The rule "docstring on every field" of schema.py, kept true by this test."""
    missing = [f"{name}: section" for name in SECTIONS if not SECTIONS[name].__doc__]
    missing += [name for name in SECTIONS if not field_docs(Config).get(name)]
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"add a docstring under: {', '.join(missing)}"


def test_field_docs_reads_the_string_under_each_field() -> None:
    docs = field_docs(SECTIONS["model"])
    assert list(docs)[:2] == ["vocab_size", "make_vocab_size_divisible_by"]
    assert docs["hidden_size"] == "Width of the residual stream."
    # Multi-line docstrings are dedented and kept whole.
    assert docs["make_vocab_size_divisible_by"].endswith("starts from the same weights.")


@pytest.mark.parametrize(("section", "f"), FIELDS, ids=_ids(FIELDS))
def test_field_appears_with_docstring_and_default(
    reference: str, section: str, f: dataclasses.Field
) -> None:
    row = _row(reference, f"{section}.{f.name}")
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[2] == f"`{format_default(default_value(f))}`"
    doc = " ".join(field_docs(SECTIONS[section])[f.name].split())
    assert cells[3] == doc.replace("|", "\\|").replace("<", "\\<")


def test_defaults_are_written_as_yaml(reference: str) -> None:
    assert r"| `model.vocab_size` | `int \| null` | `null` |" in reference
    assert "| `train.deterministic` | `bool` | `false` |" in reference
    assert "| `data.paths` | `list[str]` | `[]` |" in reference
    assert '| `precision.dtype` | `"fp32" \\| "bf16" \\| "fp16"` | `fp32` |' in reference


def test_every_section_is_headed_by_its_docstring(reference: str) -> None:
    for name, cls in SECTIONS.items():
        assert f"## {name}\n\n{cls.__doc__.strip()}\n" in reference


def test_cli_prints_the_reference(reference: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == reference


def test_docs_config_md_is_up_to_date(reference: str) -> None:
    assert DOC.is_file(), f"{DOC} is missing; run `scaletrain config reference > docs/config.md`"
    assert DOC.read_text() == reference, (
        "docs/config.md is out of date; run `scaletrain config reference > docs/config.md`"
    )
