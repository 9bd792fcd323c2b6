"""`scaletrain data prepare` on one huge line: time and peak memory against the targets.

    .venv/bin/python benchmarks/prepare_long_lines.py [--mb 30] [--kind letters|words]

Writes a single-line file of `--mb` MB (no newline at all) and runs the real command on it as
a subprocess (`--num-proc 2`, the default), sampling the resident memory of its whole process
tree (proportional set size of the main process and its tokenizing workers, summed) every
50 ms. Kinds:
  letters : random a-z, no whitespace at all: one 30 MB pre-token. Before documents were cut
            into pieces, 400 KB of this took 144 s to train a tokenizer on and 3 MB stalled
            for over 5 minutes.
  words   : Zipf-distributed words from a 30 000-word vocabulary, single spaces between
            (a prose line without newlines).
Then it checks that the prepared ids decode back to the file's text exactly.
Targets for 30 MB on a 2-core machine: under 120 s and under 2 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

TARGET_S = 120.0
TARGET_BYTES = 2 * 2**30


def make_line(kind: str, n_chars: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    if kind == "letters":
        letters = rng.integers(ord("a"), ord("z") + 1, size=n_chars, dtype=np.uint8)
        return letters.tobytes().decode("ascii")
    # Zipf-distributed words from a 30 000-word vocabulary, as in natural language.
    vocab = [
        "".join(rng.choice(list("etaoinshrdlucmfwyp"), size=rng.integers(1, 12)))
        for _ in range(30_000)
    ]
    picks = np.minimum(rng.zipf(1.1, size=n_chars // 5), len(vocab)) - 1
    return " ".join(vocab[i] for i in picks)[:n_chars]


def run_measured(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak summed PSS of the process tree, output tail).

    PSS splits pages shared by forked workers among them; summing RSS would count the parent's
    imported libraries once per worker."""
    # A file, not a pipe: progress bars could fill a pipe nobody reads until the end.
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            pss = 0
            with contextlib.suppress(psutil.Error):  # the process may end between the two calls
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        pss += p.memory_full_info().pss
            peak = max(peak, pss)
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        log.seek(0)
        return proc.returncode, seconds, peak, log.read()[-2000:]


def largest_process_bytes() -> int:
    """Exact peak RSS of the largest finished descendant (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=30.0)
    parser.add_argument("--kind", choices=("letters", "words"), default="letters")
    parser.add_argument("--vocab-size", type=int, default=4096)  # the README's default data
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prepare-long-lines-") as tmp:
        text = make_line(args.kind, int(args.mb * 1e6))
        src = Path(tmp, "line.txt")
        src.write_text(text)
        out = Path(tmp, "out")
        cmd = [sys.executable, "-m", "scaletrain", "data", "prepare", "--input", str(src)]
        cmd += ["--output", str(out), "--vocab-size", str(args.vocab_size), "--num-proc", "2"]
        code, seconds, peak, err = run_measured(cmd)
        if code != 0:
            print(f"prepare failed with exit {code}:\n{err}", file=sys.stderr)
            return 1

        from scaletrain.data import TokenDataset, load_tokenizer, read_metadata

        info = read_metadata(out)
        train = TokenDataset(out, "train", 1)  # one document: the whole line, then eos
        ids = train.tokens(0, train.num_tokens - 1)
        exact = load_tokenizer(out / "tokenizer").decode(ids.tolist()) == text
    print(
        f"{args.kind}, {args.mb:g} MB single line -> {info.splits['train'].num_tokens:,} tokens, "
        f"vocab {info.vocab_size}: {seconds:.1f} s (target < {TARGET_S:.0f} s), peak memory "
        f"{peak / 2**30:.2f} GiB (target < {TARGET_BYTES / 2**30:.0f} GiB; largest process "
        f"{largest_process_bytes() / 2**30:.2f} GiB), decodes exactly: "
        f"{'yes' if exact else 'no'}"
    )
    ok = seconds < TARGET_S and max(peak, largest_process_bytes()) < TARGET_BYTES and exact
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
