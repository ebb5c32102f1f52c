"""GLM-4.5 / 4.6 (``model_type: glm4_moe``): grouped-query attention with Q/K/V bias, partial
rotate-half RoPE and optional q/k norms (:mod:`.standard`, ``glm_attention``); DeepSeek-V3's MoE
(sigmoid grouped routing with the score-correction bias, shared expert, dense first layers).
Multi-token-prediction layers (``num_nextn_predict_layers``) are carried over by the exporter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_prefpack.models.config import ModelConfig, MoEConfig
from megatron_prefpack.models.hf import standard
from megatron_prefpack.models.hf.fields import REQUIRED, ConversionError, field
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
    def need(key: str, default: Any = REQUIRED) -> int:
        return field(hf, key, int, default)

    if not field(hf, "norm_topk_prob", bool, True):
        raise ConversionError("norm_topk_prob=false; Megatron normalises sigmoid top-k weights")
    top_k, groups, topk_groups = need("num_experts_per_tok"), need("n_group", 1), need("topk_group", 1)
    if groups > 1 and top_k // topk_groups != 2:
        raise ConversionError(
            f"num_experts_per_tok // topk_group = {top_k} // {topk_groups} != 2: GLM-4.5 scores "
            "a group by its best 2 experts, Megatron-Core by its best top_k // topk_group"
        )
    expert_size, shared = need("moe_intermediate_size"), need("n_shared_experts", 1)
    return ModelConfig(
        **standard.model_fields(hf, glm_attention=True),
        qk_layernorm=field(hf, "use_qk_norm", bool, False),
        moe=MoEConfig(
            num_experts=need("n_routed_experts"),
            top_k=top_k,
            expert_ffn_hidden_size=expert_size,
            shared_expert_ffn_hidden_size=expert_size * shared if shared else None,
            router="sigmoid_grouped",
            num_groups=groups,
            topk_groups=topk_groups,
            expert_bias=True,
            routing_scaling_factor=field(hf, "routed_scaling_factor", float, 1.0),
            first_k_dense=need("first_k_dense_replace"),
        ),
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
