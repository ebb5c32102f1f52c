"""Llama 2/3.x (``model_type: llama``): grouped-query attention, rotate-half RoPE (Llama 3.1+'s
``llama3`` frequency scaling included), SwiGLU, no biases. Config rules: :mod:`.standard`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.hf import standard
from megatron_prefpack.models.hf.fields import ConversionError
from megatron_prefpack.models.hf.mapping import Architecture, LayerRules, gqa_attention, norms, swiglu


def model_config(hf: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(**standard.model_fields(hf))


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.moe is not None or cfg.qk_layernorm:
        raise ConversionError("llama is dense, without q/k norms")
    return standard.config_fields(cfg, "llama", "Llama")


def layer_rules(cfg: ModelConfig, layer: int) -> LayerRules:
    prefix = f"model.layers.{layer}"
    return {**norms(prefix), **gqa_attention(cfg, prefix), **swiglu("mlp", f"{prefix}.mlp")}


ARCHITECTURE = Architecture("llama", "Llama", model_config, hf_config, layer_rules)
