"""What this GPU can do, measured on the spot: the MFU denominator and the kernels the run needs.

    python3 benchmarks/gpu/probe.py --out runs/gpu-kit/probe.json

- bf16 GEMM peak: an 8192^3 matmul on random data (zeros run faster and would flatter the
  peak), 3 warm-ups, then the median of 20 timed with CUDA events, over two input pairs.
- SDPA: the kernel PyTorch picks for scaletrain's attention call (bf16, causal, GQA with the
  llama-1b head layout, seq 2048, forward and backward), and whether the flash kernel takes it.
- fused AdamW on fp32 parameters on this device (the optimizer DeepSpeed's bf16 path steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def gemm_tflops(size: int = 8192, warmup: int = 3, repeats: int = 20) -> float:
    def random() -> torch.Tensor:
        return torch.randn(size, size, device="cuda", dtype=torch.bfloat16)

    pairs = [(random(), random()) for _ in range(2)]
    for i in range(warmup):
        a, b = pairs[i % 2]
        torch.mm(a, b)
    times = []
    for i in range(repeats):
        a, b = pairs[i % 2]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / statistics.median(times) / 1e12


def _attention_call(heads: int, kv_heads: int, seq: int, head_dim: int) -> None:
    """Forward and backward of scaletrain's attention call at the model's shapes."""
    q = torch.randn(8, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads > kv_heads)
    out.sum().backward()
    torch.cuda.synchronize()


def sdpa_kernels(heads: int = 16, kv_heads: int = 8, seq: int = 2048, head_dim: int = 128):
    """(the aten kernel PyTorch picks by default, whether the flash kernel takes the call)."""
    shape = (heads, kv_heads, seq, head_dim)
    _attention_call(*shape)  # warm-up outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _attention_call(*shape)
    names = [e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")]
    default = min(names, key=len) if names else "none recorded"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            _attention_call(*shape)
        flash = True
    except RuntimeError:
        flash = False
    return default, flash


def fused_adamw_ok() -> bool:
    param = torch.nn.Parameter(torch.randn(1024, device="cuda"))
    param.grad = torch.randn_like(param)
    before = param.detach().clone()
    torch.optim.AdamW([param], lr=1e-2, fused=True).step()
    return bool((param.detach() != before).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    result = {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "memory_bytes": props.total_memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gemm_bf16_tflops": gemm_tflops(),
        **dict(zip(("sdpa_default_kernel", "sdpa_flash_takes_call"), sdpa_kernels(), strict=True)),
        "fused_adamw": fused_adamw_ok(),
    }
    for key, value in result.items():
        print(f"probe {key}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
