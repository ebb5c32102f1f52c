"""GLM-4.5 / 4.6 (``model_type: glm4_moe``): grouped-query attention with Q/K/V bias, partial
rotate-half RoPE and optional q/k norms (:mod:`.standard`, ``glm_attention``); DeepSeek-V3's MoE
(sigmoid grouped routing with the score-correction bias, shared expert, dense first layers).
Multi-token-prediction layers (``num_nextn_predict_layers``) are carried over by the exporter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.hf import standard
from megatron_prefpack.models.hf.deepseek_v3 import grouped_sigmoid_moe
from megatron_prefpack.models.hf.fields import ConversionError, field
from megatron_prefpack.models.hf.mapping import (
    Architecture,
    LayerRules,
    direct,
    gqa_attention,
    norms,
    routed_experts,
    swiglu,
)


def model_config(hf: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(
        **standard.model_fields(hf, glm_attention=True),
        qk_layernorm=field(hf, "use_qk_norm", bool, False),
        moe=grouped_sigmoid_moe(hf, "GLM-4.5", first_k_dense=field(hf, "first_k_dense_replace", int)),
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    if moe is None or moe.router != "sigmoid_grouped" or moe.post_moe_norm:
        raise ConversionError("glm4_moe has a sigmoid_grouped MoE without post-MoE norm")
    config = standard.config_fields(cfg, "glm4_moe", "Glm4Moe", glm_attention=True)
    config.update(
        use_qk_norm=cfg.qk_layernorm,
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        n_shared_experts=(moe.shared_expert_ffn_hidden_size or 0) // moe.expert_ffn_hidden_size,
        n_group=moe.num_groups,
        topk_group=moe.topk_groups,
        routed_scaling_factor=moe.routing_scaling_factor or 1.0,
        first_k_dense_replace=[*cfg.moe_layer_pattern(), 1].index(1),
        norm_topk_prob=True,
        num_nextn_predict_layers=0,
    )
    return config


def layer_rules(cfg: ModelConfig, layer: int) -> LayerRules:
    prefix = f"model.layers.{layer}"
    rules = {**norms(prefix), **gqa_attention(cfg, prefix, qk_norm=cfg.qk_layernorm, bias=cfg.attention_bias)}
    if cfg.moe_layer_pattern()[layer] == 0:
        return {**rules, **swiglu("mlp", f"{prefix}.mlp")}
    rules["mlp.router.weight"] = direct(f"{prefix}.mlp.gate.weight")
    rules["mlp.router.expert_bias"] = direct(f"{prefix}.mlp.gate.e_score_correction_bias")
    rules.update(swiglu("mlp.shared_experts", f"{prefix}.mlp.shared_experts"))
    return {**rules, **routed_experts(cfg.moe.num_experts, f"{prefix}.mlp.experts")}


ARCHITECTURE = Architecture("glm4_moe", "Glm4Moe", model_config, hf_config, layer_rules)
