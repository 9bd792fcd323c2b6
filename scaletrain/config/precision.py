"""Precision settings, and whether the ranks' hardware can run them.

DeepSpeed's CPU accelerator runs fp16 only where oneDNN has fp16 kernels; elsewhere
`deepspeed.initialize` raises "Type fp16 is not supported on your device" inside every rank.
The same question asked here turns that into one line before any process starts.
"""

from __future__ import annotations

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError, require_positive


def cpu_lacks_fp16() -> bool:
    """CPU ranks whose oneDNN has no fp16 kernels (no AVX512-FP16 / AMX-FP16): DeepSpeed's CPU
    accelerator refuses fp16 there, with a traceback from inside `deepspeed.initialize`."""
    import torch  # here, not at the top: only an fp16 config pays for the import

    if torch.cuda.is_available():
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):  # a torch without the query: DeepSpeed says no too
        return True


def check_precision(config: Config, ranks_here: bool = True) -> None:
    """Loss scaling values, and fp16 only where the ranks can run it (see cpu_lacks_fp16)."""
    p = config.precision
    if p.loss_scale < 0:
        raise ConfigError("precision.loss_scale", f"must be >= 0 (0 = dynamic), got {p.loss_scale}")
    if not 0 <= p.initial_scale_power <= 32:
        raise ConfigError(
            "precision.initial_scale_power", f"must be in 0..32, got {p.initial_scale_power}"
        )
    require_positive(p.loss_scale_window, "precision.loss_scale_window")
    require_positive(p.hysteresis, "precision.hysteresis")
    require_positive(p.min_loss_scale, "precision.min_loss_scale")
    if p.dtype != "fp16" and p.loss_scale > 0:
        raise ConfigError(
            "precision.loss_scale",
            f"({p.loss_scale}) only applies to fp16, but precision.dtype is {p.dtype!r}; "
            "set it to 0",
        )
    # Last: a wrong value is reported alike on every machine, whatever its CPU.
    if p.dtype == "fp16" and ranks_here and cpu_lacks_fp16():
        raise ConfigError(
            "precision.dtype",
            "fp16 on CPU ranks needs oneDNN fp16 kernels (AVX512-FP16 or AMX-FP16), which this "
            "CPU lacks; use precision.dtype=bf16 or precision.dtype=fp32",
        )
