"""Ctrl-C on a running `scaletrain data prepare`: exit 130, one line, the old data set intact,
and no wait for the tokenizer trainer to finish first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scaletrain.data import prepare_dataset
from tests.distributed import REPO, rank_env


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.slow
def test_sigint_to_a_running_prepare(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.txt").write_text("the data set that was there before\n" * 20)
    (tmp_path / "old" / "b.txt").write_text("a second document of it\n" * 20)
    prepare_dataset([tmp_path / "old"], out, vocab_size=260, num_proc=1)
    tokenizer = tmp_path / "tok"
    os.replace(out / "tokenizer", tokenizer)  # reuse it, so the run skips training
    prepare_dataset([tmp_path / "old"], out, tokenizer=tokenizer, num_proc=1)
    before = snapshot(out)

    # 12 MB of letters in 4 files: long enough to tokenize that the signal lands mid-way.
    big = tmp_path / "big"
    big.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        letters = rng.integers(ord("a"), ord("z") + 1, size=3_000_000, dtype=np.uint8)
        (big / f"{i}.txt").write_bytes(letters.tobytes())
    cmd = [sys.executable, "-m", "scaletrain", "data", "prepare", "--input", str(big)]
    cmd += ["--output", str(out), "--tokenizer", str(tokenizer), "--num-proc", "2"]
    # A terminal's Ctrl-C signals the whole foreground group: main process and map workers.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".tmp-prepare-*/tokenizer/tokenizer.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended early"
        time.sleep(0.02)
    time.sleep(0.5)  # into the tokenizing map
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "tokenizing" in err  # it was interrupted inside the map, with its workers
    assert err.splitlines()[-1] == (
        f"interrupted: {out} holds no half-written data set; run the same command again to "
        "prepare it"
    )
    assert snapshot(out) == before  # the work folder is gone, the old data set byte for byte


TRAINING_INTERRUPTED = """
import os, signal, threading
import datasets
from scaletrain.data import tokenizing

# Like the Rust trainer, the stand-in waits with the GIL released and never checks for
# signals: in the main thread, the interrupt would wait until training is done.
release, finished = threading.Event(), threading.Event()

def slow_training(texts, vocab_size):
    release.wait(timeout=120)  # released only after the interrupt has come through
    finished.set()

tokenizing.train_tokenizer = slow_training
pieces = datasets.Dataset.from_dict({"text": ["a b"], "doc_end": [True], "unbroken": [False]})
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    tokenizing.train_on_pieces(pieces, 300)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted while training ran" if not finished.is_set() else "interrupted late")
"""


def test_ctrl_c_during_tokenizer_training_is_not_held_up() -> None:
    """In a process of its own, as `scaletrain data prepare` is: Python's own SIGINT handling,
    which earlier tests of the pytest process may have changed."""
    done = subprocess.run(
        [sys.executable, "-c", TRAINING_INTERRUPTED],
        cwd=REPO,
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip() == "interrupted while training ran", done.stderr[-2000:]
