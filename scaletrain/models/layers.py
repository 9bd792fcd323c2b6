"""The parts of a Llama block: rotary embedding, grouped-query attention, SwiGLU MLP."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scaletrain.config.schema import ModelConfig
from scaletrain.models.parallel import TensorParallel, scaled_std


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention, as Hugging Face Llama)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        # Plain attributes, not buffers: a bf16/fp16 cast of the module must not round them.
        self.cos, self.sin = angles.cos().float(), angles.sin().float()
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    @functools.cache
    def shared(head_dim: int, max_seq_len: int, theta: float) -> Rotary:
        """One table per shape for all blocks: every block (and pipeline stage) uses the same."""
        return Rotary(head_dim, max_seq_len, theta)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin on `device`, copied there once: a copy from pageable host memory in
        every call would make each block's forward wait until the GPU's queue has drained."""
        if device.type == "cpu":
            return self.cos, self.sin
        if device not in self._on_device:
            self._on_device[device] = (self.cos.to(device), self.sin.to(device))
        return self._on_device[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, heads, head_dim]."""
        seq = x.shape[1]
        cos, sin = self.tables(x.device)
        cos, sin = cos[:seq, None, :], sin[:seq, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention; heads are split over TP ranks.

    The fused QKV projection is laid out per key/value group, [q_1..q_g, k, v] for each kv
    head, so that a contiguous column split hands every TP rank whole groups.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_per_kv = cfg.num_heads // cfg.kv_heads
        self.local_kv_heads = cfg.kv_heads // tp.size
        qkv_size = cfg.kv_heads * (self.q_per_kv + 2) * cfg.head_dim
        self.qkv = tp.column(cfg.hidden_size, qkv_size, std=cfg.init_std, lora_target="qkv")
        self.out = tp.row(
            cfg.num_heads * cfg.head_dim,
            cfg.hidden_size,
            scaled_std(cfg.init_std, cfg.num_layers),
            lora_target="out",
        )

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv, _ = self.qkv(x)
        qkv = qkv.view(batch, seq, self.local_kv_heads, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(batch, seq, -1, self.head_dim)
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]
        q, k = rotary(q), rotary(k)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.q_per_kv > 1,
        )
        out, _ = self.out(attn.transpose(1, 2).reshape(batch, seq, -1))
        return out


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down; gate and up are one fused column layer."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        # stride=2: each rank keeps its slice of the gate *and* its slice of up.
        self.gate_up = tp.column(
            cfg.hidden_size, 2 * cfg.ffn_size, std=cfg.init_std, stride=2, lora_target="gate_up"
        )
        self.down = tp.row(
            cfg.ffn_size,
            cfg.hidden_size,
            scaled_std(cfg.init_std, cfg.num_layers),
            lora_target="down",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up(x)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down(F.silu(gate) * up)
        return out


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)).

    One tensor in, one out, so that it is also a pipeline stage's layer as it is. With
    `recompute` its activations are dropped after forward and recomputed in backward. `mlp`
    replaces the dense SwiGLU (an MoE block passes its `scaletrain.models.moe.MoEMLP`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp: TensorParallel,
        recompute: bool = False,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.rotary = Rotary.shared(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.recompute = recompute
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg, tp)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = mlp if mlp is not None else SwiGLU(cfg, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            # Non-reentrant: the replay runs the same TP collectives on every rank and, with
            # no dropout, gives bit-identical activations and gradients.
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), self.rotary)
        return x + self.mlp(self.mlp_norm(x))
