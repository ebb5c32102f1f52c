"""Named model shapes, from test-sized models to A.X K1.

``tiny-*`` presets are for CPU tests (fp32, a few thousand parameters; ``tiny-llama3``,
``tiny-qwen3``, ``tiny-qwen3-moe`` and ``tiny-glm4-moe`` are those Hugging Face architectures in
miniature, each with the features its family needs); ``demo-axk1`` is the CPU demo's model
(A.X K1's architecture at a few M parameters), ``demo-moe`` a plain GQA MoE of similar size (the
default of ``prefpack bench step``); ``bench-moe-1b`` a 1.4 B-parameter GQA MoE in bf16 for
one-GPU measurements (``tools/gpu_check.sh``); ``ax-k1`` and ``deepseek-v3`` are the real shapes (bf16).
Multi-token prediction (one MTP layer in both real models) is not built by this project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from megatron_prefpack.models.config import Llama3RopeConfig, MLAConfig, ModelConfig, MoEConfig, YarnConfig


def _tiny_dense() -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=96,
        max_position_embeddings=128,
    )


def _tiny_moe() -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=96,
        max_position_embeddings=128,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32, aux_loss_coeff=1e-2),
    )


def _tiny_mla_moe() -> ModelConfig:
    """A.X K1 in miniature: dense first layer, MLA with YaRN, shared expert, sigmoid grouped
    routing with expert bias and scaling, post-MoE RMSNorm."""
    return ModelConfig(
        num_layers=3,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=128,
        position_embedding="yarn",
        yarn=YarnConfig(
            scaling_factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0
        ),
        mla=MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=8),
        moe=MoEConfig(
            num_experts=8,
            top_k=4,  # of 2 groups: each group scored by its best 2, as in DeepSeek-V3
            expert_ffn_hidden_size=16,
            shared_expert_ffn_hidden_size=16,
            router="sigmoid_grouped",
            num_groups=4,
            topk_groups=2,
            expert_bias=True,
            routing_scaling_factor=2.5,
            first_k_dense=1,
            post_moe_norm=True,
        ),
    )


def _tiny_llama3() -> ModelConfig:
    """Llama 3.1+: GQA and llama3-scaled RoPE. The scaling's wavelength bands (16 and 64 tokens
    at head_dim 8) put one frequency in each branch: kept, interpolated, divided."""
    return replace(
        _tiny_dense(),
        rotary_base=10000.0,
        llama3_rope=Llama3RopeConfig(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
        ),
    )


def _tiny_qwen3() -> ModelConfig:
    """Qwen3 (dense): per-head q/k RMSNorm, tied embeddings (as the small Qwen3 models)."""
    return replace(_tiny_dense(), qk_layernorm=True, tie_embeddings=True, rotary_base=1000000.0)


def _tiny_qwen3_moe() -> ModelConfig:
    """Qwen3-MoE: q/k norm, softmax top-k renormalised, no shared expert, one dense layer
    placed by index (``mlp_only_layers``)."""
    return ModelConfig(
        num_layers=3,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,  # Qwen3 decouples head_dim from hidden_size / heads
        vocab_size=96,
        max_position_embeddings=128,
        rotary_base=1000000.0,
        qk_layernorm=True,
        moe=MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=16, dense_layers=[1]),
    )


def _tiny_glm4_moe() -> ModelConfig:
    """GLM-4.5: partial rotary (half of each head), Q/K/V bias, sigmoid grouped routing with
    expert bias, shared expert, dense first layer."""
    return ModelConfig(
        num_layers=3,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        vocab_size=96,
        max_position_embeddings=128,
        rotary_percent=0.5,
        attention_bias=True,
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            expert_ffn_hidden_size=16,
            shared_expert_ffn_hidden_size=16,
            router="sigmoid_grouped",
            num_groups=2,
            topk_groups=1,
            expert_bias=True,
            routing_scaling_factor=2.5,
            first_k_dense=1,
        ),
    )


def _demo_moe() -> ModelConfig:
    return ModelConfig(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=384,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=8192,
        max_position_embeddings=1024,
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            expert_ffn_hidden_size=128,
            shared_expert_ffn_hidden_size=128,
            aux_loss_coeff=1e-3,
            first_k_dense=1,
        ),
    )


def _demo_axk1() -> ModelConfig:
    """The CPU demo's model: ``tiny-mla-moe`` (A.X K1's architecture) grown to 2 M parameters,
    so the demo's result exports as an ``AXK1ForCausalLM`` that transformers loads."""
    tiny = _tiny_mla_moe()
    return replace(
        tiny,
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=384,
        vocab_size=8192,
        max_position_embeddings=1024,
        yarn=replace(tiny.yarn, original_max_position_embeddings=256),
        mla=MLAConfig(q_lora_rank=64, kv_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=16, v_head_dim=32),
        moe=replace(tiny.moe, num_experts=16, expert_ffn_hidden_size=64, shared_expert_ffn_hidden_size=128),
    )


def _bench_moe_1b() -> ModelConfig:
    """A one-GPU benchmark MoE (bf16): 1.4 B parameters (1.27 B besides the embeddings), 0.3 B
    active per token; GQA 16/4 heads of 128, 16 experts top-2, a dense first layer."""
    return ModelConfig(
        num_layers=12,
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_attention_heads=16,
        num_query_groups=4,
        vocab_size=32768,
        max_position_embeddings=8192,
        rotary_base=500000.0,
        moe=MoEConfig(
            num_experts=16,
            top_k=2,
            expert_ffn_hidden_size=1024,
            aux_loss_coeff=1e-3,
            first_k_dense=1,
        ),
        params_dtype="bfloat16",
        init_method_std=0.01,
    )


def _ax_k1() -> ModelConfig:
    """A.X K1 (arXiv 2601.09200): 519B total / ~33B active.

    The RoPE scaling values are not given in the design card; this preset assumes DeepSeek-V3's
    YaRN settings. Check them against the released checkpoint's config before converting weights.
    """
    return ModelConfig(
        num_layers=61,
        hidden_size=7168,
        ffn_hidden_size=18432,
        num_attention_heads=64,
        vocab_size=163840,
        max_position_embeddings=131072,
        position_embedding="yarn",
        yarn=YarnConfig(
            scaling_factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0
        ),
        mla=MLAConfig(
            q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128
        ),
        moe=MoEConfig(
            num_experts=192,
            top_k=8,
            expert_ffn_hidden_size=2048,
            shared_expert_ffn_hidden_size=2048,
            router="sigmoid_grouped",
            num_groups=8,
            topk_groups=4,
            expert_bias=True,
            routing_scaling_factor=2.5,
            first_k_dense=1,
            post_moe_norm=True,
        ),
        params_dtype="bfloat16",
        init_method_std=0.006,
    )


def _deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 (671B): A.X K1's layout with 128 heads, 256 experts, 3 dense layers, no post-MoE norm."""
    ax_k1 = _ax_k1()
    return replace(
        ax_k1,
        num_attention_heads=128,
        vocab_size=129280,
        max_position_embeddings=163840,
        moe=replace(ax_k1.moe, num_experts=256, first_k_dense=3, post_moe_norm=False),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny-dense": _tiny_dense,
    "tiny-moe": _tiny_moe,
    "tiny-mla-moe": _tiny_mla_moe,
    "tiny-llama3": _tiny_llama3,
    "tiny-qwen3": _tiny_qwen3,
    "tiny-qwen3-moe": _tiny_qwen3_moe,
    "tiny-glm4-moe": _tiny_glm4_moe,
    "demo-moe": _demo_moe,
    "demo-axk1": _demo_axk1,
    "bench-moe-1b": _bench_moe_1b,
    "ax-k1": _ax_k1,
    "deepseek-v3": _deepseek_v3,
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset (callers may modify it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.name = name
    cfg.validate()
    return cfg
