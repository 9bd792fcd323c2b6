"""Find the input files of `data prepare` and read them into one table of bounded document pieces.

Real folders hold binaries renamed .txt, latin-1 or UTF-16 files and license texts without an
extension. Text files are therefore read here rather than by `datasets`' text builder: a file
with NUL bytes is skipped, UTF-8 (or `encoding`) is decoded strictly and a file that is not valid
is kept with U+FFFD but named in a warning with its share of replaced characters. Every document
is cut into pieces (`pieces.py`) so no row of the table is unbounded.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import logging
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaletrain.data.format import DataError
from scaletrain.data.pieces import cut_document

if TYPE_CHECKING:  # `datasets` costs a second to import; only prepare needs it
    import datasets

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
PIECES_FILE = "pieces.arrow"
# Rows are flushed to the arrow file in batches of about this many characters.
_BATCH_CHARS = 32 * 2**20
_NAMES_SHOWN = 5

# Standard-library folders that are tests, data tables or vendored code rather than library code.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
)


def stdlib_sources() -> list[Path]:
    """The default corpus: the running interpreter's standard-library .py files, sorted.

    Tests, idlelib, pydoc's data tables and installed packages are left out: about 10 MB of
    code for CPython 3.11, small enough to prepare in seconds on a laptop.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        dirs = p.relative_to(root).parts[:-1]
        if _STDLIB_SKIP_DIRS.intersection(dirs) or any(d.startswith("config-") for d in dirs):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or a one-line error for an unknown one."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise DataError(
            f"unknown encoding {encoding!r}; use a Python codec name such as utf-8, latin-1, "
            "cp1252 or utf-16"
        ) from None


def resolve_inputs(
    inputs: Sequence[str | Path], exclude: Path | None = None, globs: Sequence[str] = ()
) -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of files to read.

    Folders are searched recursively, skipping hidden entries, for the supported suffixes, files
    without an extension (LICENSE, README: read as text when they are text) and names matching
    any of `globs` (read as text). Files under `exclude` (the output folder) are skipped so a
    data set never reads itself.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs given; pass files, folders or globs")
    found: set[Path] = set()
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found.update(_walk(path, globs))
        elif path.is_file():
            if not _wanted(path.name, globs):
                raise DataError(
                    f"input {text!r} has an unsupported suffix; use {' '.join(SUPPORTED_SUFFIXES)}"
                    f" or --glob '*{path.suffix}' to read it as text"
                )
            found.add(path.absolute())
        elif any(c in text for c in "*?["):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            if not matches:
                raise DataError(f"input glob {text!r} matches no files")
            for m in matches:
                if m.is_dir():
                    found.update(_walk(m, globs))
                elif _wanted(m.name, globs):
                    found.add(m.absolute())
        else:
            raise DataError(f"input {text!r} does not exist")
    if exclude is not None:
        found = {f for f in found if not f.is_relative_to(exclude)}
    if not found:
        raise DataError(
            f"no {'/'.join(SUPPORTED_SUFFIXES)} or extensionless files found in "
            f"{[str(i) for i in inputs]}; pass --glob PATTERN (e.g. '*.rst', or '*' for every "
            "file) to read other files as text"
        )
    return sorted(found, key=str)


def _wanted(name: str, globs: Sequence[str]) -> bool:
    suffix = Path(name).suffix.lower()
    return (
        suffix in SUPPORTED_SUFFIXES or not suffix or any(fnmatch.fnmatch(name, g) for g in globs)
    )


def _walk(folder: Path, globs: Sequence[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and _wanted(name, globs):
                yield Path(dirpath, name).absolute()


def input_kind(file: Path) -> str:
    """How the file is read: "json" and "parquet" by `datasets`, everything else as "text"."""
    suffix = file.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    return "parquet" if suffix in PARQUET_SUFFIXES else "text"


@dataclass
class ReadReport:
    """What reading the text files found: files skipped and files decoded with replacements."""

    binary: list[Path] = field(default_factory=list)
    invalid: list[tuple[Path, int, int]] = field(default_factory=list)
    """(file, replaced characters, characters) of files that were not valid in the encoding."""

    def warn(self, encoding: str) -> None:
        if self.binary:
            logger.warning(
                "skipped %d file(s) with NUL bytes (binary, or UTF-16/32 text: then pass "
                "--encoding utf-16): %s",
                len(self.binary),
                _names([str(f) for f in self.binary]),
            )
        if self.invalid:
            replaced = sum(r for _, r, _ in self.invalid)
            chars = sum(n for _, _, n in self.invalid)
            logger.warning(
                "%d file(s) are not valid %s; U+FFFD replaced %s of their characters: %s; "
                "if the corpus uses another encoding, pass --encoding (e.g. latin-1, cp1252)",
                len(self.invalid),
                encoding,
                _share(replaced, chars),
                _names([f"{f} ({_share(r, n)})" for f, r, n in self.invalid]),
            )


def _share(part: int, whole: int) -> str:
    return f"{100 * part / max(whole, 1):.2g}%"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def read_text(file: Path, encoding: str, report: ReadReport) -> str | None:
    """The file's text with universal newlines (as open() reads it), or None if it is binary."""
    data = file.read_bytes()
    try:
        text, replaced = data.decode(encoding), 0
    except UnicodeDecodeError:
        text = data.decode(encoding, errors="replace")
        # U+FFFD written in the file itself is not a replacement.
        original = data.count("\ufffd".encode()) if encoding == "utf-8" else 0
        replaced = text.count("\ufffd") - original
    if "\x00" in text:
        report.binary.append(file)
        return None
    if replaced:
        report.invalid.append((file, replaced, len(text)))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_pieces(
    files: list[Path], text_field: str, encoding: str, cache_dir: Path
) -> datasets.Dataset:
    """One row per document piece (columns text, doc_end, unbroken), documents in file order.

    Text files come first (one document each), then json/jsonl and parquet records. Empty
    documents are dropped: they would only add a lone eos.
    """
    import datasets

    groups: dict[str, list[Path]] = {"text": [], "json": [], "parquet": []}
    for f in files:
        groups[input_kind(f)].append(f)
    parts = []
    if groups["text"]:
        parts.append(_read_text_files(groups["text"], encoding, cache_dir))
    for builder in ("json", "parquet"):
        if groups[builder]:
            records = _load_records(builder, groups[builder], text_field, encoding, cache_dir)
            try:
                parts.append(
                    records.map(
                        _cut_batch,
                        batched=True,
                        remove_columns=["text"],
                        features=datasets.Features(
                            {
                                "text": datasets.Value("string"),
                                "doc_end": datasets.Value("bool"),
                                "unbroken": datasets.Value("bool"),
                            }
                        ),
                        desc="cutting documents",
                    )
                )
            except UnicodeDecodeError as e:  # pyarrow's json reader lets invalid UTF-8 through
                raise DataError(
                    f"a {builder} input holds text that is not valid {encoding} ({e.reason} at "
                    f"byte {e.start} of a record); pass --encoding (e.g. latin-1) for such a corpus"
                ) from None
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DataError(f"the {len(files)} input files hold no text (all empty or skipped)")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _cut_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"text": [], "doc_end": [], "unbroken": []}
    for text in batch["text"]:
        for piece in cut_document(text) if text else []:
            out["text"].append(piece.text)
            out["doc_end"].append(piece.doc_end)
            out["unbroken"].append(piece.unbroken)
    return out


def _read_text_files(files: list[Path], encoding: str, cache_dir: Path) -> datasets.Dataset:
    """Stream the pieces of every text file into an arrow file and memory-map it."""
    import datasets
    import pyarrow as pa

    schema = pa.schema([("text", pa.string()), ("doc_end", pa.bool_()), ("unbroken", pa.bool_())])
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / PIECES_FILE
    report = ReadReport()
    rows: list[Any] = []
    chars = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:

        def flush() -> None:
            columns = list(zip(*rows, strict=True))
            writer.write_batch(pa.record_batch([pa.array(c) for c in columns], schema=schema))
            rows.clear()

        for f in files:
            text = read_text(f, encoding, report)
            if not text:
                continue
            for piece in cut_document(text):
                rows.append(piece)
                chars += len(piece.text)
            if chars >= _BATCH_CHARS:
                flush()
                chars = 0
        if rows:
            flush()
    report.warn(encoding)
    return datasets.Dataset.from_file(str(path))


def _load_records(
    builder: str, files: list[Path], text_field: str, encoding: str, cache_dir: Path
) -> datasets.Dataset:
    """The text column of json/jsonl or parquet files, as a string column named "text"."""
    import datasets

    # datasets treats data_files as patterns; escaping keeps names like "a[1].json" literal.
    paths = [glob.escape(str(f)) for f in files]
    kwargs: dict[str, Any] = {"encoding": encoding} if builder == "json" else {}
    ds = datasets.load_dataset(
        builder, data_files=paths, split="train", cache_dir=str(cache_dir), **kwargs
    )
    if text_field not in ds.column_names:
        raise DataError(
            f"{builder} inputs have no {text_field!r} field (columns: {ds.column_names}); "
            "set text_field"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    ftype = getattr(ds.features["text"], "dtype", type(ds.features["text"]).__name__)
    if ftype not in ("string", "large_string"):
        raise DataError(f"field {text_field!r} holds {ftype}, not text; set text_field")
    if ftype == "large_string":  # e.g. parquet from polars; parts must agree to concatenate
        ds = ds.cast_column("text", datasets.Value("string"))
    return ds
