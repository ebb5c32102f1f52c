"""DeepSeek-V3, Llama (``llama3`` RoPE), Qwen3 (q/k norms, tied embeddings), Qwen3-MoE (``norm_topk_prob``
true and false, a dense layer from ``mlp_only_layers``) and GLM-4.5 (Q/K/V bias, half-rotary
RoPE, q/k norms, grouped sigmoid routing with correction bias) against transformers.

Each tiny random model is saved with ``save_pretrained``; its ``config.json`` must read as the
expected :class:`ModelConfig` and its generated ``config.json`` back; its weights are imported
into this package's model (packed log-probs equal transformers on each prompt + response alone,
<= 1e-5) and exported from it again (the same tensors, bit for bit).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf_checks import assert_close, hf_logprobs, packed_logprobs, randomize, read_tensors
from tests.test_hf_reference import deepseek_v3_shaped
from tests.test_hf_reference import hf_config as deepseek_v3_config

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
MODELS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True),
    "qwen3_moe_norm_topk": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "qwen3_moe_raw_topk": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=False,
    ),
    "deepseek_v3": lambda: deepseek_v3_config(deepseek_v3_shaped()),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **COMMON,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        attention_bias=True,
        use_qk_norm=True,
        n_routed_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
    ),
}


@pytest.fixture(scope="module", params=list(MODELS))
def hf_model(request, tmp_path_factory):
    hf = transformers.AutoModelForCausalLM.from_config(MODELS[request.param]()).eval()
    randomize(hf, seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()  # tied weights as saved
    return directory, hf_logprobs(hf, COMMON["vocab_size"])


@pytest.mark.usefixtures("megatron_single_process")
def test_import_is_exact_and_export_gives_the_same_tensors(hf_model) -> None:
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.models.hf import (
        SafetensorsCheckpoint,
        fill_model,
        generated_hf_config,
        hf_tensors,
        read_model_config,
    )

    directory, expected = hf_model
    arch, cfg = read_model_config(directory)
    hf_json = json.loads((directory / "config.json").read_text())
    assert arch.model_type == hf_json["model_type"]
    assert cfg.qk_layernorm == (arch.model_type in ("qwen3", "qwen3_moe", "glm4_moe"))
    assert cfg.attention_bias == (arch.model_type == "glm4_moe")
    generated_hf_config(arch, cfg)  # reads back as the same model
    model = build_model(cfg)
    source = SafetensorsCheckpoint(directory)
    fill_model(model, arch, cfg, source)
    assert source.used == set(source.files)
    assert_close(packed_logprobs(model, cfg.vocab_size), expected)

    exported = dict(hf_tensors(model, arch, cfg))
    original = read_tensors(directory)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
