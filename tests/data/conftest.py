"""Tiny corpora and prepared data sets shared by the data tests.

Helpers are handed out as fixtures rather than imported, so these tests work under any pytest
import mode and never clash with another folder's helper module.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from scaletrain.data import PreparedInfo, prepare_dataset

# Code, prose, unicode and odd whitespace; each entry is one document (one file).
DOCS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "# Überschrift\n\nGrüße aus Köln — naïve café, 日本語のテキスト, emoji 🐍👩‍💻.\n",
    "\ttabs\tand  double  spaces   \n\n\n   trailing   \n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(os.getpid() % 2)\n",
    "Windows line\r\nendings are normalised by the text reader?\r\n",
    "for i in range(10):\n    print(i ** 2, end=' ')\n",
    "x = {'a': [1, 2, 3], 'b': (4, 5)}  # dict literal\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "a literal <|endoftext|> inside a document stays text\n",
    "async def fetch(url: str) -> bytes:\n    async with session.get(url) as r:\n"
    "        return await r.read()\n",
    "λx. x + 1    ∀ε>0 ∃δ>0\n",
    "try:\n    pass\nexcept ValueError as e:\n    raise RuntimeError('bad') from e\n",
    "SELECT * FROM users WHERE id = 42;\n",
    "    leading spaces only on this line\n",
    "# TODO: write more documents\n" * 3,
    "while True:\n    break\n",
    "print('hello, world')\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "lambda: None\n",
]


def _write_docs(folder: Path, docs: list[str], suffix: str = ".txt") -> list[Path]:
    """One file per document, bytes written exactly (no newline translation)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, doc in enumerate(docs):
        f = folder / f"doc_{i:03d}{suffix}"
        f.write_bytes(doc.encode())
        files.append(f)
    return files


def _split_docs(path: Path, info: PreparedInfo, split: str) -> list[np.ndarray]:
    """The split's documents (with their trailing eos) from the raw shard files."""
    s = info.splits[split]
    parts = [np.fromfile(path / sh.file, dtype=info.dtype) for sh in s.shards]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=info.dtype)
    offsets = np.load(path / s.index_file)
    return [stream[a:b] for a, b in itertools.pairwise(offsets)]


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return list(DOCS)


@pytest.fixture(scope="session")
def write_docs() -> Callable[..., list[Path]]:
    """write_docs(folder, docs, suffix=".txt"): one file per document, bytes written as is."""
    return _write_docs


@pytest.fixture(scope="session")
def split_docs() -> Callable[[Path, PreparedInfo, str], list[np.ndarray]]:
    """split_docs(path, info, split): the split's documents (each ending in eos) from the shards."""
    return _split_docs


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    _write_docs(folder, DOCS)
    return folder


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> PreparedInfo:
    """The corpus with a trained 300-token tokenizer and 64-byte (32-token) shards."""
    out = tmp_path_factory.mktemp("prepared") / "ds"
    return prepare_dataset(
        [corpus_dir], out, vocab_size=300, val_fraction=0.2, num_proc=1, max_shard_bytes=64
    )
