"""Cut long documents into bounded pieces whose token ids, joined, are those of the whole text.

Why: HF tokenizers' BPE trainer spends time quadratic in the length of one pre-token (a 400 KB
line without spaces took 144 s to train on), and encoding keeps a ~100-byte record per token, so
one 30 MB line stalled `data prepare` for minutes and took gigabytes. Pieces keep both linear.

Documents of at most `MAX_PIECE_CHARS` are never cut. A longer one is cut just before a space
that sits between two non-space characters: no pre-token of a GPT-2-style byte-level tokenizer
(nor of the cl100k / Llama-3 split patterns, nor Metaspace) spans such a place, so encoding the
pieces one by one gives exactly the ids of the whole document. Only runs of more than
`MAX_RUN_CHARS` non-space characters (a base64 blob, a minified line) are cut every
`RUN_PIECE_CHARS` wherever they fall: such pieces are flagged `unbroken`, their ids may differ
from encoding the run whole, and they still decode to the exact text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

MAX_PIECE_CHARS = 65536
MAX_RUN_CHARS = 4096
RUN_PIECE_CHARS = 1024
# Look for a cut in the last few KB of a window first: a window of prose has thousands.
_TAIL_CHARS = 4096

_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")
_ANY_SPACE = re.compile(r"(?<=\S)\s")
# Anchored at the start of a run (lookbehind), so each run is scanned once: linear time.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")


class Piece(NamedTuple):
    """One bounded part of a document."""

    text: str
    doc_end: bool
    """The document's last piece: eos follows its ids."""
    unbroken: bool
    """Cut out of a run without spaces (ids near the cut may differ from the whole run's)."""


def cut_document(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[Piece]:
    """The document as pieces of at most `max_chars` characters (one piece when it fits)."""
    if len(text) <= max_chars:
        return [Piece(text, True, False)]
    pieces = list(_cut(text, max_chars))
    pieces[-1] = pieces[-1]._replace(doc_end=True)
    return pieces


def _cut(text: str, max_chars: int) -> Iterator[Piece]:
    pos = 0
    for run in _LONG_RUN.finditer(text):
        start, end = run.span()
        yield from _cut_at_spaces(text, pos, start, max_chars)
        for i in range(start, end, RUN_PIECE_CHARS):
            yield Piece(text[i : min(i + RUN_PIECE_CHARS, end)], False, True)
        pos = end
    yield from _cut_at_spaces(text, pos, len(text), max_chars)


def _cut_at_spaces(text: str, lo: int, hi: int, max_chars: int) -> Iterator[Piece]:
    """Pieces of text[lo:hi], each ending before a safe space (see the module text)."""
    while hi - lo > max_chars:
        cut = _last_match(_SAFE_CUT, text, lo, lo + max_chars) or _last_match(
            _ANY_SPACE, text, lo, lo + max_chars
        )
        cut = cut or lo + max_chars  # no space at all, yet no long run: e.g. newline-separated
        yield Piece(text[lo:cut], False, False)
        lo = cut
    if hi > lo:
        yield Piece(text[lo:hi], False, False)


def _last_match(pattern: re.Pattern[str], text: str, lo: int, limit: int) -> int | None:
    """Start of the last match in (lo, limit], trying the window's tail first."""
    for start in (max(lo + 1, limit - _TAIL_CHARS), lo + 1):
        last = None
        # endpos one past the candidate so its lookahead sees the next character.
        for m in pattern.finditer(text, start, limit + 2):
            if m.start() <= limit:
                last = m.start()
        if last is not None:
            return last
    return None
