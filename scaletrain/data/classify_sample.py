"""A small real classification task, offline: which top-level standard-library package a chunk of
source code comes from, read from this Python's own standard library.

    python -m scaletrain.data.classify_sample data/classify-stdlib.csv     # ~1,600 rows, 6 labels
    scaletrain data prepare --format classify --input data/classify-stdlib.csv \\
        --output data/classify-stdlib --tokenizer data/stdlib/tokenizer \\
        --text-field text --label-field package --max-length 128

A chunk is about `CHUNK_CHARS` characters of consecutive non-blank lines of one file; each
package gives at most `per_package` chunks (spread evenly over its files), so the classes are
imbalanced only where a package is small (json). `configs/runs/classify-stdlib.yaml` trains on
it and `benchmarks/classify_stdlib.py` measures it; the tests build it the same way.
"""

from __future__ import annotations

import csv
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scaletrain.data.sources import stdlib_sources

PACKAGES = ("asyncio", "email", "json", "multiprocessing", "unittest", "xml")
CHUNK_CHARS = 480


def chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Consecutive non-blank lines joined until a chunk holds about `size` characters."""
    lines: list[str] = []
    count = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        lines.append(line)
        count += len(line) + 1
        if count >= size:
            yield "\n".join(lines)
            lines, count = [], 0
    if count >= size // 2:
        yield "\n".join(lines)


def stdlib_chunks(
    packages: tuple[str, ...] = PACKAGES, per_package: int = 300, seed: int = 0
) -> list[dict[str, str]]:
    """{"text", "package"} rows: up to `per_package` chunks of each package's sources."""
    by_package: dict[str, list[str]] = {p: [] for p in packages}
    root = Path(sysconfig.get_paths()["stdlib"])
    for file in stdlib_sources():
        top = file.relative_to(root).parts[0]
        if top in by_package:
            by_package[top] += chunks(file.read_text(encoding="utf-8", errors="replace"))
    rng = np.random.default_rng(seed)
    rows = []
    for package, found in by_package.items():
        picks = sorted(rng.permutation(len(found))[:per_package])
        rows += [{"text": found[i], "package": package} for i in picks]
    return rows


def write_sample(out: Path, per_package: int = 300) -> int:
    """Write the rows as csv or jsonl (by the suffix of `out`); returns how many."""
    rows = stdlib_chunks(per_package=per_package)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        with out.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "package"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m scaletrain.data.classify_sample OUT.csv|OUT.jsonl")
    print(f"wrote {write_sample(Path(sys.argv[1]))} labelled chunks to {sys.argv[1]}")
