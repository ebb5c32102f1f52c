"""Qwen3 dense (``model_type: qwen3``): Llama's layout plus an RMSNorm over each query and key
head before RoPE (``q_norm``/``k_norm``), an explicit ``head_dim``, tied embeddings in the
small models. Config rules: :mod:`.standard`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.hf import standard
from megatron_prefpack.models.hf.fields import ConversionError
from megatron_prefpack.models.hf.mapping import Architecture, LayerRules, gqa_attention, norms, swiglu


def model_config(hf: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(**standard.model_fields(hf), qk_layernorm=True)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.moe is not None or not cfg.qk_layernorm:
        raise ConversionError("qwen3 is dense, with q/k norms")
    return standard.config_fields(cfg, "qwen3", "Qwen3")


def layer_rules(cfg: ModelConfig, layer: int) -> LayerRules:
    prefix = f"model.layers.{layer}"
    return {**norms(prefix), **gqa_attention(cfg, prefix, qk_norm=True), **swiglu("mlp", f"{prefix}.mlp")}


ARCHITECTURE = Architecture("qwen3", "Qwen3", model_config, hf_config, layer_rules)
