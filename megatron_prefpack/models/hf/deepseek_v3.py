"""DeepSeek-V3 (``model_type: deepseek_v3``; also Kimi-K2's weights): MLA with interleaved
(YaRN) RoPE, sigmoid grouped routing with the score-correction bias, a shared expert, dense
first layers. A.X K1 (:mod:`.axk1`) reuses this file with its one difference.

Refused because Megatron-Core computes them differently: non-interleaved RoPE, unnormalised
top-k weights, a group score other than the sum of the best two, and ``rms_norm_eps`` other than
1e-6 (transformers normalises the MLA latents ``q_a_layernorm``/``kv_a_layernorm`` with 1e-6
whatever ``rms_norm_eps`` says; Megatron with ``rms_norm_eps``).

Multi-token-prediction layers (``num_nextn_predict_layers``, stored as layers
``num_hidden_layers..``) are not part of the converted model; the exporter carries them over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_prefpack.models.config import MLAConfig, ModelConfig, MoEConfig, YarnConfig
from megatron_prefpack.models.hf.fields import (
    REQUIRED,
    ConversionError,
    expect,
    field,
    mlp_layer_types,
    rope_parameters,
)
from megatron_prefpack.models.hf.mapping import (
    Architecture,
    LayerRules,
    direct,
    mla_attention,
    norms,
    routed_experts,
    swiglu,
)

MLA_LATENT_NORM_EPS = 1e-6
"""transformers' fixed eps for ``q_a_layernorm`` / ``kv_a_layernorm``."""


def _yarn(rope: Mapping[str, Any]) -> YarnConfig:
    def get(key: str, default: Any = REQUIRED) -> float:
        return field(rope, key, float, default, where="rope_parameters.")

    return YarnConfig(
        scaling_factor=get("factor"),
        original_max_position_embeddings=field(
            rope, "original_max_position_embeddings", int, where="rope_parameters."
        ),
        beta_fast=get("beta_fast", 32.0),
        beta_slow=get("beta_slow", 1.0),
        mscale=get("mscale", 1.0),
        mscale_all_dim=get("mscale_all_dim", 0.0),
    )


def _dense_placement(types: list[str]) -> dict[str, Any]:
    """``first_k_dense`` for dense-then-sparse ``mlp_layer_types``, else ``dense_layers``."""
    count = types.count("dense")
    if types == ["dense"] * count + ["sparse"] * (len(types) - count):
        return {"first_k_dense": count}
    return {"dense_layers": [i for i, t in enumerate(types) if t == "dense"]}


def grouped_sigmoid_moe(hf: Mapping[str, Any], family: str, **placement: Any) -> MoEConfig:
    """The MoE section of a DeepSeek-V3-style router (DeepSeek-V3, A.X K1, GLM-4.5): sigmoid
    scores with a correction bias, experts in groups, the best ``topk_group`` groups kept, weights
    renormalised and scaled, shared experts. Refuses what Megatron-Core computes differently
    (``family`` names the model in the message); ``placement`` adds the dense-layer fields and
    any other :class:`MoEConfig` field."""

    def need(key: str, default: Any = REQUIRED) -> int:
        return field(hf, key, int, default)

    if not field(hf, "norm_topk_prob", bool, True):
        raise ConversionError("norm_topk_prob=false; Megatron normalises sigmoid top-k weights")
    top_k, groups, topk_groups = need("num_experts_per_tok"), need("n_group", 1), need("topk_group", 1)
    if topk_groups < 1:
        raise ConversionError(f"topk_group={topk_groups}; must be >= 1")
    if groups > 1 and top_k // topk_groups != 2:
        raise ConversionError(
            f"num_experts_per_tok // topk_group = {top_k} // {topk_groups} != 2: {family} scores "
            "a group by its best 2 experts, Megatron-Core by its best top_k // topk_group"
        )
    expert_size, shared = need("moe_intermediate_size"), need("n_shared_experts", 1)
    return MoEConfig(
        num_experts=need("n_routed_experts"),
        top_k=top_k,
        expert_ffn_hidden_size=expert_size,
        shared_expert_ffn_hidden_size=expert_size * shared if shared else None,
        router="sigmoid_grouped",
        num_groups=groups,
        topk_groups=topk_groups,
        expert_bias=True,
        routing_scaling_factor=field(hf, "routed_scaling_factor", float, 1.0),
        **placement,
    )


def model_config(hf: Mapping[str, Any], *, post_moe_norm: bool = False) -> ModelConfig:
    """The :class:`ModelConfig` of a DeepSeek-V3-architecture ``config.json`` (as a dict)."""

    def need(key: str, default: Any = REQUIRED) -> int:
        return field(hf, key, int, default)

    if not field(hf, "rope_interleave", bool, True):
        raise ConversionError("rope_interleave=false; Megatron's MLA RoPE expects interleaved weights")
    if (scoring := field(hf, "scoring_func", str, "sigmoid")) != "sigmoid":
        raise ConversionError(f"scoring_func={scoring!r}; only 'sigmoid' is supported")
    expect(hf, "topk_method", "noaux_tc", "only DeepSeek-V3's noaux_tc routing converts")
    expect(hf, "hidden_act", "silu", "only SwiGLU (silu) MLPs convert")
    expect(hf, "attention_bias", False, "MLA projections have no bias in Megatron")
    eps = field(hf, "rms_norm_eps", float, 1e-6)
    if eps != MLA_LATENT_NORM_EPS:
        raise ConversionError(
            f"rms_norm_eps={eps}: transformers normalises MLA's q_a/kv_a latents with eps 1e-6 "
            "whatever rms_norm_eps says, Megatron with rms_norm_eps; only 1e-6 converts exactly"
        )
    rope = rope_parameters(hf)
    if rope["rope_type"] not in ("default", "yarn"):
        raise ConversionError(f"rope type {rope['rope_type']!r}; 'default' or 'yarn' only")
    yarn = _yarn(rope) if rope["rope_type"] == "yarn" else None
    num_layers = need("num_hidden_layers")
    return ModelConfig(
        num_layers=num_layers,
        hidden_size=need("hidden_size"),
        ffn_hidden_size=need("intermediate_size"),
        num_attention_heads=need("num_attention_heads"),
        vocab_size=need("vocab_size"),
        max_position_embeddings=need("max_position_embeddings"),
        position_embedding="yarn" if yarn else "rope",
        rotary_base=field(rope, "rope_theta", float, where="rope_parameters."),
        yarn=yarn,
        norm_epsilon=eps,
        tie_embeddings=field(hf, "tie_word_embeddings", bool, False),
        mla=MLAConfig(
            q_lora_rank=need("q_lora_rank", None),
            kv_lora_rank=need("kv_lora_rank"),
            qk_head_dim=need("qk_nope_head_dim"),
            qk_pos_emb_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
        ),
        moe=grouped_sigmoid_moe(
            hf,
            "DeepSeek-V3",
            **_dense_placement(mlp_layer_types(hf, num_layers)),
            post_moe_norm=post_moe_norm,
        ),
    )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` fields of ``cfg`` (the inverse of :func:`model_config`)."""
    mla, moe = cfg.mla, cfg.moe
    if mla is None or moe is None or moe.router != "sigmoid_grouped":
        raise ConversionError("a DeepSeek-V3-architecture model needs mla and a sigmoid_grouped moe")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.yarn is not None:
        y = cfg.yarn
        rope = {
            "rope_type": "yarn",
            "rope_theta": cfg.rotary_base,
            "factor": y.scaling_factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }
    return {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "moe_intermediate_size": moe.expert_ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "n_shared_experts": (moe.shared_expert_ffn_hidden_size or 0) // moe.expert_ffn_hidden_size,
        "n_routed_experts": moe.num_experts,
        "routed_scaling_factor": moe.routing_scaling_factor or 1.0,
        "kv_lora_rank": mla.kv_lora_rank,
        "q_lora_rank": mla.q_lora_rank,
        "qk_rope_head_dim": mla.qk_pos_emb_head_dim,
        "qk_nope_head_dim": mla.qk_head_dim,
        "v_head_dim": mla.v_head_dim,
        "n_group": moe.num_groups,
        "topk_group": moe.topk_groups,
        "num_experts_per_tok": moe.top_k,
        "first_k_dense_replace": [*cfg.moe_layer_pattern(), 1].index(1),
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_interleave": True,
        "rope_parameters": rope,
        "attention_bias": False,
        "num_nextn_predict_layers": 0,
    }


def layer_rules(cfg: ModelConfig, layer: int) -> LayerRules:
    """Decoder layer ``layer``: MLA, then a dense SwiGLU MLP or the MoE block (router + correction
    bias, shared expert, routed experts, and A.X K1's post-MoE norm at the layer level)."""
    prefix = f"model.layers.{layer}"
    rules = {**norms(prefix), **mla_attention(prefix)}
    if cfg.moe_layer_pattern()[layer] == 0:
        rules.update(swiglu("mlp", f"{prefix}.mlp"))
        return rules
    rules["mlp.router.weight"] = direct(f"{prefix}.mlp.gate.weight")
    rules["mlp.router.expert_bias"] = direct(f"{prefix}.mlp.gate.e_score_correction_bias")
    rules.update(swiglu("mlp.shared_experts", f"{prefix}.mlp.shared_experts"))
    rules.update(routed_experts(cfg.moe.num_experts, f"{prefix}.mlp.experts"))
    if cfg.moe.post_moe_norm:
        rules["mlp.post_norm.weight"] = direct(f"{prefix}.post_mlp_layernorm.weight")
    return rules


ARCHITECTURE = Architecture(
    model_type="deepseek_v3",
    class_prefix="DeepseekV3",
    model_config=model_config,
    hf_config=hf_config,
    layer_rules=layer_rules,
)
