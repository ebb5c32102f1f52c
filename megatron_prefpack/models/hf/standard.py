"""``config.json`` <-> :class:`ModelConfig` for the standard-attention decoders (Llama, Qwen3,
Qwen3-MoE, GLM-4.5): grouped-query attention with rotate-half RoPE (default or ``llama3``
scaling), SwiGLU MLPs, RMSNorm, optionally tied embeddings.

``glm_attention``: GLM-4.5's variant, whose ``attention_bias`` covers Q/K/V only (Megatron's
``attention_bias``) and whose RoPE may rotate part of each head (``partial_rotary_factor`` ->
``rotary_percent``). Elsewhere ``attention_bias`` also biases ``o_proj`` and is refused.
Refused too because Megatron would compute them differently or not at all: MLP biases, another
activation, sliding-window attention, other RoPE scalings, ``pretraining_tp`` > 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_prefpack.models.config import Llama3RopeConfig
from megatron_prefpack.models.hf.fields import REQUIRED, ConversionError, expect, field, rope_parameters


def _llama3(rope: Mapping[str, Any]) -> Llama3RopeConfig:
    def get(key: str, kind: type = float) -> Any:
        return field(rope, key, kind, where="rope_parameters.")

    return Llama3RopeConfig(
        factor=get("factor"),
        low_freq_factor=get("low_freq_factor"),
        high_freq_factor=get("high_freq_factor"),
        original_max_position_embeddings=get("original_max_position_embeddings", int),
    )


def model_fields(hf: Mapping[str, Any], glm_attention: bool = False) -> dict[str, Any]:
    """The :class:`ModelConfig` keyword arguments every standard-attention model has."""

    def need(key: str, default: Any = REQUIRED) -> int:
        return field(hf, key, int, default)

    expect(hf, "hidden_act", "silu", "only SwiGLU (silu) MLPs convert")
    extra: dict[str, Any] = {}
    if glm_attention:
        extra["attention_bias"] = field(hf, "attention_bias", bool, False)
    else:
        expect(hf, "attention_bias", False, "the output projection's bias has no Megatron counterpart")
    expect(hf, "mlp_bias", False, "MLP biases have no Megatron counterpart")
    expect(hf, "use_sliding_window", False, "sliding-window attention is not supported")
    expect(hf, "pretraining_tp", 1, "only pretraining_tp 1 (exact matmuls) converts")
    layer_types = hf.get("layer_types")
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        raise ConversionError(f"layer_types={sorted(set(layer_types))}: only full_attention layers convert")
    rope = rope_parameters(hf)
    if rope["rope_type"] not in ("default", "llama3"):
        raise ConversionError(f"rope type {rope['rope_type']!r}; 'default' or 'llama3' only")
    if glm_attention:
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        extra["rotary_percent"] = field({"partial_rotary_factor": partial}, "partial_rotary_factor", float)
    heads = need("num_attention_heads")
    return dict(
        **extra,
        num_layers=need("num_hidden_layers"),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=need("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=need("num_key_value_heads", heads),
        kv_channels=need("head_dim", None),
        vocab_size=need("vocab_size"),
        max_position_embeddings=need("max_position_embeddings"),
        rotary_base=field(rope, "rope_theta", float, where="rope_parameters."),
        llama3_rope=_llama3(rope) if rope["rope_type"] == "llama3" else None,
        norm_epsilon=field(hf, "rms_norm_eps", float, 1e-6),
        tie_embeddings=field(hf, "tie_word_embeddings", bool, False),
    )


def config_fields(
    cfg: Any, model_type: str, class_prefix: str, glm_attention: bool = False
) -> dict[str, Any]:
    """The ``config.json`` fields :func:`model_fields` reads, for ``cfg``."""
    if cfg.mla is not None or cfg.position_embedding != "rope":
        raise ConversionError(f"{model_type} has standard attention with RoPE")
    if not glm_attention and (cfg.attention_bias or cfg.rotary_percent != 1):
        raise ConversionError(f"{model_type} has full-rotary attention without Q/K/V bias")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if glm_attention:
        rope["partial_rotary_factor"] = cfg.rotary_percent
    if cfg.llama3_rope is not None:
        r = cfg.llama3_rope
        rope.update(
            rope_type="llama3",
            factor=r.factor,
            low_freq_factor=r.low_freq_factor,
            high_freq_factor=r.high_freq_factor,
            original_max_position_embeddings=r.original_max_position_embeddings,
        )
    return {
        "model_type": model_type,
        "architectures": [f"{class_prefix}ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups or cfg.num_attention_heads,
        "head_dim": cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "attention_bias": cfg.attention_bias,
    }
