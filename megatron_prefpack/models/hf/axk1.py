"""A.X K1 (``model_type: axk1``, transformers >= 5.24 ``AXK1ForCausalLM``): DeepSeek-V3's
architecture (:mod:`.deepseek_v3`) plus an RMSNorm on the MoE block's output, saved at the layer
level as ``model.layers.{i}.post_mlp_layernorm.weight``. Its ``config.json`` lists
``mlp_layer_types`` instead of ``first_k_dense_replace`` and always has a ``q_lora_rank``.

The released checkpoints route without ``e_score_correction_bias``; transformers loads zeros
for it, and so does the importer (and says so).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.hf import deepseek_v3
from megatron_prefpack.models.hf.fields import ConversionError
from megatron_prefpack.models.hf.mapping import Architecture


def model_config(hf: Mapping[str, Any]) -> ModelConfig:
    if hf.get("q_lora_rank") is None:
        raise ConversionError("missing field 'q_lora_rank' (A.X K1 always compresses queries)")
    return deepseek_v3.model_config(hf, post_moe_norm=True)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.moe is None or not cfg.moe.post_moe_norm or cfg.mla is None or cfg.mla.q_lora_rank is None:
        raise ConversionError("an A.X K1 model needs moe.post_moe_norm and mla.q_lora_rank")
    config = deepseek_v3.hf_config(cfg)
    config.update(model_type="axk1", architectures=["AXK1ForCausalLM"])
    del config["first_k_dense_replace"], config["num_nextn_predict_layers"]
    config["mlp_layer_types"] = ["dense" if p == 0 else "sparse" for p in cfg.moe_layer_pattern()]
    return config


ARCHITECTURE = Architecture(
    model_type="axk1",
    class_prefix="AXK1",
    model_config=model_config,
    hf_config=hf_config,
    layer_rules=deepseek_v3.layer_rules,
    zeros_when_missing=(".mlp.gate.e_score_correction_bias",),
)
