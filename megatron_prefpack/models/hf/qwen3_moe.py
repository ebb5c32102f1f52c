"""Qwen3-MoE (``model_type: qwen3_moe``; Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (q/k
norms) with MoE MLPs: softmax router (``mlp.gate``), top-k renormalised or not
(``norm_topk_prob``), no shared expert; dense layers from ``mlp_only_layers`` and
``decoder_sparse_step``. Config rules: :mod:`.standard`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_prefpack.models.config import ModelConfig, MoEConfig
from megatron_prefpack.models.hf import standard
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
    fields = standard.model_fields(hf)
    step = field(hf, "decoder_sparse_step", int, 1)
    only = field(hf, "mlp_only_layers", list, [])
    dense = [i for i in range(fields["num_layers"]) if i in only or (i + 1) % step]
    return ModelConfig(
        **fields,
        qk_layernorm=True,
        moe=MoEConfig(
            # Released configs say num_experts; transformers >= 5 writes num_local_experts.
            num_experts=field(hf, "num_experts" if "num_experts" in hf else "num_local_experts", int),
            top_k=field(hf, "num_experts_per_tok", int),
            expert_ffn_hidden_size=field(hf, "moe_intermediate_size", int),
            router="softmax",
            normalize_topk=field(hf, "norm_topk_prob", bool, False),
            dense_layers=dense or None,
        ),
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    if moe is None or moe.router != "softmax" or moe.shared_expert_ffn_hidden_size or not cfg.qk_layernorm:
        raise ConversionError("qwen3_moe has q/k norms and a softmax-routed MoE without shared expert")
    config = standard.config_fields(cfg, "qwen3_moe", "Qwen3Moe")
    dense = [i for i, p in enumerate(cfg.moe_layer_pattern()) if p == 0]
    config.update(
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        norm_topk_prob=moe.normalize_topk,
        decoder_sparse_step=1,
        mlp_only_layers=dense,
    )
    return config


def layer_rules(cfg: ModelConfig, layer: int) -> LayerRules:
    prefix = f"model.layers.{layer}"
    rules = {**norms(prefix), **gqa_attention(cfg, prefix, qk_norm=True)}
    if cfg.moe_layer_pattern()[layer] == 0:
        return {**rules, **swiglu("mlp", f"{prefix}.mlp")}
    rules["mlp.router.weight"] = direct(f"{prefix}.mlp.gate.weight")
    return {**rules, **routed_experts(cfg.moe.num_experts, f"{prefix}.mlp.experts")}


ARCHITECTURE = Architecture("qwen3_moe", "Qwen3Moe", model_config, hf_config, layer_rules)
