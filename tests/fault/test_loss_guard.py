"""LossGuard verdicts: consecutive skips and spikes, with exact inputs and outputs."""

from __future__ import annotations

from scaletrain.config.schema import FaultConfig
from scaletrain.fault.guards import LossGuard, Verdict

STEADY = [2.0, 2.1, 1.9, 2.0, 2.1, 1.9]  # mean 2.0, population std 0.0816


def fed(guard: LossGuard, losses: list[float]) -> LossGuard:
    for loss in losses:
        assert guard.observe(loss, skipped=False) == Verdict(False, None)
    return guard


def test_rollback_after_n_consecutive_skips_only() -> None:
    guard = LossGuard(FaultConfig(max_consecutive_skips=3))
    assert guard.observe(float("nan"), skipped=True) == Verdict(False, None)
    assert guard.observe(float("nan"), skipped=True) == Verdict(False, None)
    assert guard.observe(2.0, skipped=False) == Verdict(False, None)  # the run is broken
    assert guard.observe(float("nan"), skipped=True) == Verdict(False, None)
    assert guard.observe(float("nan"), skipped=True) == Verdict(False, None)
    assert guard.observe(float("inf"), skipped=True) == Verdict(
        False, "3 consecutive skipped steps"
    )
    assert guard.consecutive_skips == 0


def test_zero_never_rolls_back() -> None:
    guard = LossGuard(FaultConfig(max_consecutive_skips=0))
    assert all(guard.observe(float("nan"), True) == Verdict(False, None) for _ in range(10))


def test_spike_needs_a_full_window_and_is_z_sigma_above_the_mean() -> None:
    guard = fed(LossGuard(FaultConfig(spike_zscore=3.0, spike_window=6)), STEADY[:5])
    assert guard.observe(9.0, skipped=False) == Verdict(False, None)  # window not full yet
    guard = fed(LossGuard(FaultConfig(spike_zscore=3.0, spike_window=6)), STEADY)
    assert guard.observe(2.2, skipped=False) == Verdict(False, None)  # z = 2.45
    assert guard.observe(2.5, skipped=False) == Verdict(True, None)  # z > 3: logged only
    assert list(guard.history) == [2.1, 1.9, 2.0, 2.1, 1.9, 2.2]  # the spike is not history


def test_spike_rolls_back_when_asked() -> None:
    config = FaultConfig(spike_zscore=3.0, spike_window=6, spike_action="rollback")
    guard = fed(LossGuard(config), STEADY)
    assert guard.observe(4.0, skipped=False) == Verdict(True, "loss spike (4.0000)")
    guard.reset()
    assert len(guard.history) == 0


def test_disabled_spike_detection() -> None:
    guard = fed(LossGuard(FaultConfig(spike_zscore=0.0, spike_window=6)), STEADY)
    assert guard.observe(100.0, skipped=False) == Verdict(False, None)
