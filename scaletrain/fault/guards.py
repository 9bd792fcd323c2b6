"""Guards on the loss: runs of skipped (non-finite) steps and loss spikes.

Non-finite steps are skipped by DeepSpeed's own overflow check (fp16, bf16 and ZeRO >= 1) or by
`engine.deepspeed.skip_update` (ZeRO-0 fp32); this module only watches the outcome and says when
the run should roll back to its last checkpoint. Every rank sees the same reduced loss and the
same skip flag, so every rank reaches the same verdict without talking.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from scaletrain.config.schema import FaultConfig
from scaletrain.errors import ScaletrainError
from scaletrain.logs import get_logger
from scaletrain.train.callbacks import GUARD, Callback

log = get_logger(__name__)


@dataclass(frozen=True)
class Verdict:
    """What one step's loss means."""

    spike: bool
    rollback: str | None
    """Why the run should roll back now, or None."""


class LossGuard:
    """Counts consecutive skipped steps and flags losses far above the recent ones."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self.history: deque[float] = deque(maxlen=config.spike_window)
        self.consecutive_skips = 0

    def observe(self, loss: float, skipped: bool) -> Verdict:
        c = self.config
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if c.max_consecutive_skips and self.consecutive_skips >= c.max_consecutive_skips:
            self.consecutive_skips = 0
            return Verdict(False, f"{c.max_consecutive_skips} consecutive skipped steps")
        if skipped or not math.isfinite(loss):
            return Verdict(False, None)
        spike = self._is_spike(loss)
        if spike and c.spike_action == "rollback":
            return Verdict(True, f"loss spike ({loss:.4f})")
        if not spike:  # a spike does not become the new normal
            self.history.append(loss)
        return Verdict(spike, None)

    def _is_spike(self, loss: float) -> bool:
        if not self.config.spike_zscore or len(self.history) < self.history.maxlen:
            return False
        mean = statistics.fmean(self.history)
        spread = statistics.pstdev(self.history) or 1e-12
        return (loss - mean) / spread > self.config.spike_zscore

    def reset(self) -> None:
        """After a rollback the old window describes a model we no longer have."""
        self.history.clear()
        self.consecutive_skips = 0


class GuardCallback(Callback):
    """After each step: flag a spike, or reload the newest good checkpoint when the guard says
    so. The data sampler keeps going, so the batches since that checkpoint are skipped rather
    than replayed."""

    priority = GUARD

    def __init__(self, guard: LossGuard) -> None:
        self.guard = guard

    def on_step_end(self, metrics: dict[str, Any]) -> None:
        verdict = self.guard.observe(metrics["loss"], metrics["skipped"])
        if verdict.spike:
            metrics["loss_spike"] = True
            log.warning("loss spike at step %d: %.4f", self.trainer.step, metrics["loss"])
        if verdict.rollback:
            metrics["rolled_back_to"] = self.rollback(verdict.rollback)

    def rollback(self, reason: str) -> int:
        """Returns the step rolled back to."""
        t = self.trainer
        folder = t.checkpoints.newest_good()
        if folder is None:
            raise ScaletrainError(
                f"fault: {reason} at step {t.step} and no checkpoint to roll back to; "
                "set checkpoint.interval or fix the data/learning rate"
            )
        failed_step = t.step
        state = t.checkpoints.load(t.engine, folder, full=True)
        assert state is not None  # a full load always returns the loop state
        t.step = state.step
        self.guard.reset()
        log.warning(
            "%s at step %d: rolled back to %s; the batches since are skipped",
            reason,
            failed_step,
            folder.name,
        )
        return t.step
