"""The DeepSeek-V3 / A.X K1-shaped model against an independent implementation.

Hugging Face transformers' ``DeepseekV3ForCausalLM`` (MLA with interleaved YaRN RoPE, sigmoid
grouped routing with the score-correction bias, shared expert, dense first layer) is given
random weights; the same weights go into this package's Megatron-Core model. Each response's
log-probs from preference-packed rows must equal those of Hugging Face running prompt +
response alone. The weight-name mapping here is the one a checkpoint converter needs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.presets import preset
from tests.test_model_equivalence import make_batch, make_groups, response_token_logprobs, single_batch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV3ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV3ForCausalLM", allow_module_level=True)


def deepseek_v3_shaped() -> ModelConfig:
    """``tiny-mla-moe`` without A.X K1's post-MoE norm: DeepSeek-V3's architecture in miniature."""
    cfg = preset("tiny-mla-moe")
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, post_moe_norm=False))


def hf_config(cfg: ModelConfig):
    mla, moe, yarn = cfg.mla, cfg.moe, cfg.yarn
    return transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=moe.shared_expert_ffn_hidden_size // moe.expert_ffn_hidden_size,
        n_routed_experts=moe.num_experts,
        routed_scaling_factor=moe.routing_scaling_factor,
        kv_lora_rank=mla.kv_lora_rank,
        q_lora_rank=mla.q_lora_rank,
        qk_rope_head_dim=mla.qk_pos_emb_head_dim,
        qk_nope_head_dim=mla.qk_head_dim,
        v_head_dim=mla.v_head_dim,
        n_group=moe.num_groups,
        topk_group=moe.topk_groups,
        num_experts_per_tok=moe.top_k,
        first_k_dense_replace=moe.first_k_dense,
        norm_topk_prob=True,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=False,
        rope_interleave=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": cfg.rotary_base,
            "factor": yarn.scaling_factor,
            "original_max_position_embeddings": yarn.original_max_position_embeddings,
            "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow,
            "mscale": yarn.mscale,
            "mscale_all_dim": yarn.mscale_all_dim,
        },
        attn_implementation="eager",
    )


def megatron_state_from_hf(hf: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face DeepSeek-V3 parameters under this package's (local-spec) names."""
    src = {k: v.detach() for k, v in hf.state_dict().items()}
    out = {
        "embedding.word_embeddings.weight": src["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": src["model.norm.weight"],
        "output_layer.weight": src["lm_head.weight"],
    }
    attention = {
        "q_a_proj": "linear_q_down_proj",
        "q_a_layernorm": "q_layernorm",
        "q_b_proj": "linear_q_up_proj",
        "kv_a_proj_with_mqa": "linear_kv_down_proj",
        "kv_a_layernorm": "kv_layernorm",
        "kv_b_proj": "linear_kv_up_proj",
        "o_proj": "linear_proj",
    }

    def mlp(hf_prefix: str, prefix: str) -> None:
        gate, up = src[f"{hf_prefix}.gate_proj.weight"], src[f"{hf_prefix}.up_proj.weight"]
        out[f"{prefix}.linear_fc1.weight"] = torch.cat([gate, up])  # Megatron's SwiGLU: [gate; up]
        out[f"{prefix}.linear_fc2.weight"] = src[f"{hf_prefix}.down_proj.weight"]

    for i in range(cfg.num_layers):
        h, m = f"model.layers.{i}", f"decoder.layers.{i}"
        out[f"{m}.input_layernorm.weight"] = src[f"{h}.input_layernorm.weight"]
        out[f"{m}.pre_mlp_layernorm.weight"] = src[f"{h}.post_attention_layernorm.weight"]
        for hf_name, name in attention.items():
            out[f"{m}.self_attention.{name}.weight"] = src[f"{h}.self_attn.{hf_name}.weight"]
        if i < cfg.moe.first_k_dense:
            mlp(f"{h}.mlp", f"{m}.mlp")
            continue
        out[f"{m}.mlp.router.weight"] = src[f"{h}.mlp.gate.weight"]
        out[f"{m}.mlp.router.expert_bias"] = src[f"{h}.mlp.gate.e_score_correction_bias"]
        mlp(f"{h}.mlp.shared_experts", f"{m}.mlp.shared_experts")
        for e in range(cfg.moe.num_experts):
            # gate_up_proj[e] is already [gate; up]
            out[f"{m}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = src[
                f"{h}.mlp.experts.gate_up_proj"
            ][e]
            out[f"{m}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = src[f"{h}.mlp.experts.down_proj"][e]
    return out


@pytest.mark.usefixtures("megatron_single_process")
def test_packed_logprobs_equal_hugging_face_deepseek_v3_run_alone() -> None:
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.models.forward import model_forward

    cfg = deepseek_v3_shaped()
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():  # exercise every weight, the correction bias included
        for name, param in hf.named_parameters():
            param.copy_(torch.randn_like(param) * (0.5 if "norm" in name else 0.1) + ("norm" in name))
        for layer in hf.model.layers[cfg.moe.first_k_dense :]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.moe.num_experts) * 0.1)

    model = build_model(cfg).eval()
    missing, unexpected = model.load_state_dict(megatron_state_from_hf(hf, cfg), strict=False)
    assert [k for k in missing if not k.endswith("_extra_state")] == [] and unexpected == []

    groups = make_groups(seed=3, vocab_size=cfg.vocab_size)
    with torch.no_grad():
        packed = response_token_logprobs(
            model_forward(model, make_batch(groups, "packed")), make_batch(groups, "packed")
        )
        for group in groups:
            for k in range(len(group.responses)):
                alone = single_batch(group, k)
                hf_logits = hf(input_ids=alone.tokens).logits
                expected = response_token_logprobs(hf_logits, alone)[(group.group_id, k)]
                diff = (packed[(group.group_id, k)] - expected).abs().max().item()
                assert diff <= 1e-5, f"group {group.group_id} response {k}: max |diff| {diff:.3g}"
