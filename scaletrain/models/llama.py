"""The `llama` family (dense decoder): its split plan and its HF `LlamaForCausalLM` config.

The model itself is `scaletrain.models.gpt.GPT`; this module says how its weights are split
over TP and named in Hugging Face, and how its config maps to `LlamaConfig`.
"""

from __future__ import annotations

from typing import Any

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ScaletrainError
from scaletrain.models.split_plan import Split, SplitPlan, Weight

HF_ARCHITECTURE = "LlamaForCausalLM"
HF_MODEL_TYPE = "llama"
_LAYER = "model.layers.{layer}."


def attention_weights() -> list[Weight]:
    """The weights every family's decoder block shares: norms and attention."""
    return [
        Weight(
            "blocks.{layer}.attn_norm.weight",
            Split.REPLICATED,
            (_LAYER + "input_layernorm.weight",),
        ),
        Weight(
            "blocks.{layer}.attn.qkv.weight",
            Split.QKV,
            tuple(_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
        ),
        Weight("blocks.{layer}.attn.out.weight", Split.ROW, (_LAYER + "self_attn.o_proj.weight",)),
        Weight(
            "blocks.{layer}.mlp_norm.weight",
            Split.REPLICATED,
            (_LAYER + "post_attention_layernorm.weight",),
        ),
    ]


def outer_weights(cfg: ModelConfig) -> list[Weight]:
    """Embedding, final norm and (unless tied) the head."""
    weights = [
        Weight("embedding.weight", Split.VOCAB, ("model.embed_tokens.weight",)),
        Weight("norm.weight", Split.REPLICATED, ("model.norm.weight",)),
    ]
    if not cfg.tie_embeddings:
        weights.append(Weight("head.proj.weight", Split.VOCAB, ("lm_head.weight",)))
    return weights


def dense_mlp_weights() -> list[Weight]:
    return [
        Weight(
            "blocks.{layer}.mlp.gate_up.weight",
            Split.GATE_UP,
            (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"),
        ),
        Weight("blocks.{layer}.mlp.down.weight", Split.ROW, (_LAYER + "mlp.down_proj.weight",)),
    ]


def split_plan(cfg: ModelConfig) -> SplitPlan:
    return SplitPlan(tuple(outer_weights(cfg) + attention_weights() + dense_mlp_weights()))


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `LlamaConfig` fields of this model (every one whose HF default differs or matters)."""
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,  # HF's default is 1e-6, ours 1e-5
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
    }


def model_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Our `ModelConfig` fields from a Llama-like HF config.json (refused in one line where our
    model cannot express it)."""
    for key, ok in (
        ("hidden_act", lambda v: v in (None, "silu")),
        ("attention_bias", lambda v: not v),
        ("mlp_bias", lambda v: not v),
        ("rope_scaling", lambda v: not v or v.get("rope_type") == "default"),
        ("rope_parameters", lambda v: not v or v.get("rope_type", "default") == "default"),
    ):
        if not ok(hf.get(key)):
            raise ScaletrainError(f"{where}: {key}={hf.get(key)!r} is not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ScaletrainError(
            f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}"
        )
    rope = hf.get("rope_parameters") or {}
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "ffn_hidden_size": hf["intermediate_size"],
        "max_seq_len": hf["max_position_embeddings"],
        "rope_theta": float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        "norm_eps": float(hf["rms_norm_eps"]),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
