"""`scaletrain launch local`: torchrun on this machine, with signals passed on and the ranks' code.

The ranks' launcher (`scaletrain.launch.agent`, torchrun's agent with the ranks' exit code)
runs as a child in its own session, so a Ctrl-C in the terminal reaches only this launcher,
which turns it into a stop request: SIGINT, SIGTERM and SIGUSR1 become SIGTERM to the agent,
which passes it to every rank; the ranks agree, save and exit 75. A second Ctrl-C kills the
agent (and with it the ranks). The exit status is the run's: 0 done, 2 refused, 75 stopped
resumably, 124 hung, a crash's code otherwise; the last line on stderr says which.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
from types import FrameType

from scaletrain.fault.signals import on_parent_death
from scaletrain.launch.outcome import exit_status
from scaletrain.logs import get_logger

log = get_logger(__name__)

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def local_command(nproc: int, config: str, overrides: list[str]) -> list[str]:
    """`torchrun --standalone` (our agent) with this interpreter: the same venv runs every rank."""
    return [
        sys.executable,
        "-m",
        "scaletrain.launch.agent",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "scaletrain",
        "train",
        "--config",
        config,
        *overrides,
    ]


def run_local(nproc: int, config: str, overrides: list[str]) -> int:
    """Run the ranks to the end; returns the run's exit status (0, 2, 75, 124, ...)."""
    proc = subprocess.Popen(
        local_command(nproc, config, overrides),
        start_new_session=True,
        # In torchrun: SIGTERM (a stop request, not a kill) if this launcher dies.
        preexec_fn=functools.partial(on_parent_death, signal.SIGTERM),
    )
    requests = 0

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal requests
        requests += 1
        name = signal.Signals(signum).name
        if requests == 1:
            log.warning("%s: asking the ranks to save and stop (again to kill them)", name)
            proc.send_signal(signal.SIGTERM)
        else:
            log.warning("%s again: killing torchrun", name)
            proc.kill()

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        returncode = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if returncode < 0:  # killed (a second Ctrl-C): the agent said nothing
        log.error("the ranks' launcher was killed by %s", signal.Signals(-returncode).name)
    return exit_status(returncode)
