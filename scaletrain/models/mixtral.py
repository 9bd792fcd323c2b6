"""The `mixtral` family (MoE decoder): its split plan and its Hugging Face `MixtralForCausalLM`
config.

Attention, norms, embedding and head are the llama family's; every block's MLP is a router and
SwiGLU experts on DeepSpeed's MoE layer (`scaletrain.models.moe`). The HF names are those of
Mixtral's safetensors files (`block_sparse_moe.experts.E.w1/w3/w2`: gate, up, down), which
transformers 5 reads and writes although it stacks the experts in memory.
"""

from __future__ import annotations

from typing import Any

from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ScaletrainError
from scaletrain.models import llama
from scaletrain.models.split_plan import Split, SplitPlan, Weight

HF_ARCHITECTURE = "MixtralForCausalLM"
HF_MODEL_TYPE = "mixtral"
_MOE = "blocks.{layer}.mlp.moe.deepspeed_moe."
_EXPERT = _MOE + "experts.deepspeed_experts.{expert}."
_HF = "model.layers.{layer}.block_sparse_moe."
_HF_EXPERT = _HF + "experts.{expert}."
# Routing options MixtralForCausalLM lacks carry DeepSeek-V3's HF names (consolidate writes them).
_SHARED = "blocks.{layer}.mlp.shared."
_HF_SHARED = "model.layers.{layer}.mlp.shared_experts."
_HF_SHARED_GATE, _HF_SHARED_UP = _HF_SHARED + "gate_proj.weight", _HF_SHARED + "up_proj.weight"
_HF_SHARED_DOWN = _HF_SHARED + "down_proj.weight"
_HF_BIAS = "model.layers.{layer}.mlp.gate.e_score_correction_bias"


def split_plan(cfg: ModelConfig) -> SplitPlan:
    moe = [
        Weight(_MOE + "gate.wg.weight", Split.REPLICATED, (_HF + "gate.weight",)),
        Weight(
            _EXPERT + "gate_up.weight",
            Split.GATE_UP,
            (_HF_EXPERT + "w1.weight", _HF_EXPERT + "w3.weight"),
        ),
        Weight(_EXPERT + "down.weight", Split.ROW, (_HF_EXPERT + "w2.weight",)),
    ]
    if cfg.moe_router_bias_update_rate > 0:  # DeepSeek-V3's name for the selection bias
        moe.append(Weight(_MOE + "gate.score_bias", Split.REPLICATED, (_HF_BIAS,)))
    if cfg.moe_shared_experts:  # one SwiGLU of n x the width, as DeepSeek-V3's HF layout
        moe += [
            Weight(_SHARED + "gate_up.weight", Split.GATE_UP, (_HF_SHARED_GATE, _HF_SHARED_UP)),
            Weight(_SHARED + "down.weight", Split.ROW, (_HF_SHARED_DOWN,)),
        ]
    weights = llama.outer_weights(cfg) + llama.attention_weights() + moe
    if cfg.moe_layer_freq != 1:
        weights += llama.dense_mlp_weights()
    return SplitPlan(tuple(weights))


def exportable(cfg: ModelConfig, where: str) -> None:
    """Refuse, in one line, what `MixtralForCausalLM` cannot express."""
    if cfg.moe_top_k == 1 and not cfg.moe_top1_normalize:
        raise ScaletrainError(
            f"{where}: top-1 routing with model.moe_top1_normalize=false cannot be exported to "
            "MixtralForCausalLM (it weights the expert by its raw gate probability, HF Mixtral "
            "renormalises the chosen gates to 1)"
        )
    if cfg.moe_score_function != "softmax":
        raise ScaletrainError(
            f"{where}: model.moe_score_function={cfg.moe_score_function} cannot be exported to "
            "MixtralForCausalLM, whose router is a softmax"
        )
    if cfg.moe_shared_experts:
        raise ScaletrainError(
            f"{where}: model.moe_shared_experts={cfg.moe_shared_experts} cannot be exported to "
            "MixtralForCausalLM, which has no shared experts"
        )
    if cfg.moe_router_bias_update_rate > 0:
        raise ScaletrainError(
            f"{where}: model.moe_router_bias_update_rate={cfg.moe_router_bias_update_rate:g} "
            "routes with a per-expert bias, which MixtralForCausalLM's router does not have"
        )
    if cfg.moe_layer_freq != 1:
        raise ScaletrainError(
            f"{where}: model.moe_layer_freq={cfg.moe_layer_freq} mixes dense and MoE blocks; "
            "MixtralForCausalLM has MoE in every block"
        )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    fields = llama.hf_config(cfg)
    for key in ("mlp_bias", "attention_bias"):
        fields.pop(key)
    fields.update(
        architectures=[HF_ARCHITECTURE],
        model_type=HF_MODEL_TYPE,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_top_k,
        router_aux_loss_coef=cfg.moe_aux_loss_coeff,
        output_router_logits=False,
        router_jitter_noise=0.0,
        sliding_window=None,
    )
    return fields


def model_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if hf.get("sliding_window"):
        raise ScaletrainError(f"{where}: sliding_window={hf['sliding_window']} is not supported")
    if hf.get("num_experts_per_tok", 2) != 2:
        raise ScaletrainError(
            f"{where}: num_experts_per_tok={hf['num_experts_per_tok']}; scaletrain's MoE "
            "matches Mixtral's routing at top-2 only"
        )
    fields = llama.model_fields(hf, where)
    fields.update(
        num_experts=hf["num_local_experts"],
        moe_top_k=2,
        moe_layer_freq=1,
        # HF Mixtral drops no token: size the capacity to the busiest expert.
        moe_drop_tokens=False,
    )
    return fields
