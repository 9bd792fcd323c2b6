"""A small real SFT data set, offline: "what does `module.function(args)` do?" -> the first
line of its docstring, from this Python's own standard library sources.

    python -m scaletrain.data.sft_sample data/sft-stdlib.jsonl      # ~1,500 records
    scaletrain data prepare --format prompt-response --input data/sft-stdlib.jsonl \\
        --output data/sft-tiny --tokenizer data/stdlib/tokenizer

`configs/runs/sft-tiny.yaml` trains on it; the tests build it the same way.
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from scaletrain.data.sources import stdlib_sources


def stdlib_pairs(limit_files: int | None = None) -> Iterator[dict[str, str]]:
    """{"prompt", "response"} for each documented public top-level function."""
    root_parts = len(Path(ast.__file__).parent.parts)
    for file in stdlib_sources()[:limit_files]:
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(file.with_suffix("").parts[root_parts:]).removesuffix(".__init__")
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if len(line) < 8:
                continue
            args = ", ".join(a.arg for a in node.args.args)
            yield {"prompt": f"What does {module}.{node.name}({args}) do?", "response": line}


def write_sample(out: Path, limit_files: int | None = None) -> int:
    """Write the pairs as jsonl; returns how many."""
    rows = [json.dumps(p) for p in stdlib_pairs(limit_files)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m scaletrain.data.sft_sample OUT.jsonl")
    print(f"wrote {write_sample(Path(sys.argv[1]))} prompt/response pairs to {sys.argv[1]}")
