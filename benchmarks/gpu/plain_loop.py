"""The GPU kit's baseline: scaletrain's model, batches and optimizer in a plain PyTorch loop.

    python3 benchmarks/gpu/plain_loop.py --config benchmarks/gpu/llama-1b-h200.yaml \
        --steps 30 --out runs/gpu-kit/plain.json [overrides]

The model is the one `scaletrain.models.gpt.GPT` builds at TP1 (the same parameter names and
shapes, the fused QKV laid out per key/value group, gate|up fused, the same fp32 rotary and
fp32 loss, SDPA causal with GQA) made of plain `nn.Linear`s. Training is what DeepSpeed does
for bf16 at ZeRO-0: bf16 weights and gradients, fp32 master weights that torch's fused AdamW
updates (decay on matrices only), gradient clipping on the global norm, the same warmup+cosine
schedule. The batches come from scaletrain's dataset and sampler with the run's seed. Writes
every step's loss and time and the peak CUDA memory as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import ModelConfig


class Rotary(nn.Module):
    """The rotate-half rotary embedding of scaletrain's layers, its tables kept in fp32."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str) -> None:
        super().__init__()
        dim = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        # Plain attributes: the model's bf16 cast must not round them.
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[1]
        cos, sin = self.cos[:seq, None, :], self.sin[:seq, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim, self.kv_heads = cfg.head_dim, cfg.kv_heads
        self.q_per_kv = cfg.num_heads // cfg.kv_heads
        qkv = cfg.kv_heads * (self.q_per_kv + 2) * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, qkv, bias=False)
        self.out = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = self.qkv(x).view(batch, seq, self.kv_heads, self.q_per_kv + 2, self.head_dim)
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
        return self.out(attn.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=False)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.rotary = [rotary]  # shared, and not a submodule: no parameters of its own
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), self.rotary[0])
        return x + self.mlp(self.mlp_norm(x))


class Head(nn.Module):
    """Named `head.proj` as scaletrain's vocabulary head, so weights copy over by name."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, padded_vocab_size, bias=False)


class PlainLlama(nn.Module):
    """Takes [batch, seq + 1] token windows; returns the mean next-token loss (fp32)."""

    def __init__(
        self, cfg: ModelConfig, padded_vocab_size: int, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        rotary = Rotary(cfg, device)
        with torch.device(device):
            self.embedding = nn.Embedding(padded_vocab_size, cfg.hidden_size)
            self.blocks = nn.ModuleList(Block(cfg, rotary) for _ in range(cfg.num_layers))
            self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
            self.head = None if cfg.tie_embeddings else Head(cfg, padded_vocab_size)

    def init_weights(self) -> None:
        """scaletrain's scheme: normal(init_std), residual outputs scaled by 1/sqrt(2 layers)."""
        std = self.cfg.init_std
        scaled = std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                nn.init.ones_(param)
            else:
                out = name.endswith(("attn.out.weight", "mlp.down.weight"))
                nn.init.normal_(param, mean=0.0, std=scaled if out else std)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        inputs, labels = window[:, :-1], window[:, 1:]
        x = self.embedding(inputs)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        weight = self.embedding.weight if self.head is None else self.head.proj.weight
        logits = F.linear(x, weight)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


class MasterWeights:
    """bf16 model, fp32 masters updated by fused AdamW, then copied back: DeepSpeed's bf16
    ZeRO-0 optimizer (FP16_UnfusedOptimizer) written with foreach ops."""

    def __init__(self, model: nn.Module, optim, steps: int) -> None:
        from scaletrain.train.schedule import build_scheduler

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        decay = optim.weight_decay
        groups = [
            {"params": [m for m in self.masters if m.dim() >= 2], "weight_decay": decay},
            {"params": [m for m in self.masters if m.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True
        )
        self.scheduler = build_scheduler(self.optimizer, optim, steps)
        self.clip = optim.grad_clip

    def step(self) -> None:
        for master, param in zip(self.masters, self.params, strict=True):
            master.grad = param.grad.float()
            param.grad = None
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        for master in self.masters:
            master.grad = None
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.masters)


def train(config, resolved, device: torch.device) -> dict:
    """`config.train.steps` steps of the plain loop; every step's loss and time, peak memory."""
    from scaletrain.data import GlobalBatchSampler, build_dataset

    t = config.train
    torch.manual_seed(t.seed)
    model = PlainLlama(config.model, resolved.padded_vocab_size, device)
    model.init_weights()
    model.to(torch.bfloat16)
    optimizer = MasterWeights(model, config.optim, t.steps)
    dataset = build_dataset(config.data.paths, config.data.weights, "train", t.seq_len, t.seed)
    sampler = GlobalBatchSampler(
        len(dataset), resolved.global_batch, 0, 1, t.seed, shuffle=config.data.shuffle
    )
    steps = []
    for step in range(1, t.steps + 1):
        start = time.perf_counter()
        windows = torch.from_numpy(np.stack([dataset[int(i)] for i in sampler.next_batch()]))
        windows = windows.to(device)
        losses = []
        for micro in windows.split(resolved.micro_batch):
            loss = model(micro) / resolved.grad_accum
            loss.backward()
            losses.append(loss.detach())
        optimizer.step()
        value = torch.stack(losses).sum().item()  # waits for the step, as scaletrain's does
        elapsed = time.perf_counter() - start
        steps.append({"step": step, "loss": value, "step_time": elapsed})
        print(f"plain step {step}: loss {value:.4f}, {elapsed * 1e3:.1f} ms", flush=True)
    cuda = device.type == "cuda"
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": resolved.global_batch * t.seq_len,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "steps": steps,
    }


def main() -> None:
    from scaletrain.config import check_config, load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="benchmarks/gpu/llama-1b-h200.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, [*args.overrides, f"train.steps={args.steps}"])
    result = train(config, check_config(config, world_size=1), torch.device(args.device))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
