"""The model features the Hugging Face architectures need (Llama 3, Qwen3, Qwen3-MoE, GLM-4.5),
each checked against transformers' own code where the math is ours to get right:

* llama3 RoPE scaling: inverse frequencies equal transformers' ``rope_type: llama3`` init exactly;
* partial rotary: rotated queries/keys equal transformers' GLM-4.5 ``apply_rotary_pos_emb``;
* q/k norm: Megatron's per-head query/key RMSNorm equals transformers' ``Qwen3RMSNorm`` per head;
* ``normalize_topk``: routing weights equal transformers' ``Qwen3MoeTopKRouter`` both ways;
* Q/K/V bias, MoE layer placement by index, tied embeddings (also under pipeline parallelism:
  the last stage's copy starts equal and packed log-probs still equal each response run alone);
* every refused combination is a ``ModelConfigError`` naming the field.

Packed log-probs with each feature on are tested in ``test_model_equivalence.py`` (the
``tiny-llama3``, ``tiny-qwen3``, ``tiny-qwen3-moe`` and ``tiny-glm4-moe`` presets).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from megatron_prefpack.models.config import Llama3RopeConfig, ModelConfig, ModelConfigError, MoEConfig
from megatron_prefpack.models.presets import preset
from tests.test_model_equivalence import build, make_groups, single_token_logprobs

transformers = pytest.importorskip("transformers")

LLAMA3_CASES = [
    # (head_dim, rope_theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    (8, 10000.0, 8.0, 1.0, 4.0, 64),  # tiny-llama3: one frequency in each band
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
    (128, 500000.0, 16.0, 2.0, 8.0, 4096),  # factors Megatron's GPTModel cannot pass
]


def _hf_llama3_inv_freq(head_dim: int, theta: float, llama3: Llama3RopeConfig) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=llama3.original_max_position_embeddings * 2,
        rope_parameters={"rope_type": "llama3", "rope_theta": theta, **dataclasses.asdict(llama3)},
    )
    return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]


@pytest.mark.parametrize(("head_dim", "theta", "factor", "low", "high", "original"), LLAMA3_CASES)
def test_llama3_inverse_frequencies_equal_transformers(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_prefpack.models.rope import apply_llama3_scaling

    llama3 = Llama3RopeConfig(factor, low, high, original)
    rotary = RotaryEmbedding(
        kv_channels=head_dim, rotary_percent=1.0, rotary_base=theta, use_cpu_initialization=True
    )
    unscaled = rotary.inv_freq.clone()
    apply_llama3_scaling(rotary, llama3)
    expected = _hf_llama3_inv_freq(head_dim, theta, llama3)
    assert torch.equal(rotary.inv_freq, expected), (rotary.inv_freq, expected)
    assert not torch.equal(unscaled, expected)


@pytest.mark.usefixtures("megatron_single_process")
def test_builder_scales_the_model_rope() -> None:
    cfg, model = build("tiny-llama3")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = _hf_llama3_inv_freq(head_dim, cfg.rotary_base, cfg.llama3_rope)
    assert torch.equal(model.rotary_pos_emb.inner.inv_freq, expected)


@pytest.mark.usefixtures("megatron_single_process")
def test_partial_rotary_equals_glm4_moe() -> None:
    """Megatron's RoPE with ``rotary_percent=0.5`` at packed position ids rotates queries and keys
    exactly as transformers' GLM-4.5 (first half of each head, rotate-half pairing)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.models.glm4_moe import modeling_glm4_moe as glm

    from megatron_prefpack.models.config import to_transformer_config
    from megatron_prefpack.models.rope import PositionFollowingRotary

    cfg = preset("tiny-glm4-moe")
    head_dim, theta = cfg.kv_channels, 1000000.0
    hf_config = transformers.Glm4MoeConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        head_dim=head_dim,
        partial_rotary_factor=cfg.rotary_percent,
        rope_theta=theta,
    )
    # A packed row: prefix 0..4, then two segments restarting at the prompt's last position.
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6]])
    heads = cfg.num_attention_heads
    q, k = torch.randn(2, 1, heads, positions.shape[1], head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = glm.Glm4MoeRotaryEmbedding(hf_config)(q, positions)
    q_hf, k_hf = glm.apply_rotary_pos_emb(q, k, cos, sin)

    rotary = RotaryEmbedding(
        kv_channels=head_dim,
        rotary_percent=cfg.rotary_percent,
        rotary_base=theta,
        use_cpu_initialization=True,
    )
    freqs = PositionFollowingRotary(rotary, cfg.max_position_embeddings).frequencies(positions)
    tcfg = to_transformer_config(cfg)
    for ours_in, hf_out in ((q, q_hf), (k, k_hf)):
        ours = apply_rotary_pos_emb(ours_in.permute(2, 0, 1, 3), freqs, config=tcfg)  # (S, B, H, D)
        torch.testing.assert_close(ours.permute(1, 2, 0, 3), hf_out, rtol=0, atol=1e-6)
    assert torch.equal(q_hf[..., head_dim // 2 :], q[..., head_dim // 2 :]), "second half passes through"


def _layer_params(model: torch.nn.Module, layer: int = 0) -> dict[str, torch.Tensor]:
    prefix = f"decoder.layers.{layer}.self_attention."
    return {n[len(prefix) :]: p for n, p in model.named_parameters() if n.startswith(prefix)}


@pytest.mark.usefixtures("megatron_single_process")
def test_qk_layernorm_is_per_head_rmsnorm_before_rope() -> None:
    """The query/key heads out of Megatron's projection step (RoPE comes after it) equal
    transformers' ``Qwen3RMSNorm`` applied to each head of the raw projection."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    cfg, model = build("tiny-qwen3-moe")
    params = _layer_params(model)
    head_dim, heads, groups = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    assert params["q_layernorm.weight"].shape == params["k_layernorm.weight"].shape == (head_dim,)
    attention = model.decoder.layers[0].self_attention
    with torch.no_grad():
        for name in ("q_layernorm.weight", "k_layernorm.weight"):
            params[name].uniform_(0.5, 1.5)  # not the all-ones init, so the weight is checked too
        hidden = torch.randn(5, 1, cfg.hidden_size)
        query, key, _ = attention.get_query_key_value_tensors(hidden)
        # Megatron's fused QKV rows, per query group: its query heads, then one key, one value head.
        raw = (hidden @ params["linear_qkv.weight"].t()).view(5, 1, groups, heads // groups + 2, head_dim)
        raw_q = raw[..., : heads // groups, :].reshape(5, 1, heads, head_dim)
        raw_k = raw[..., heads // groups, :]
        for ours, raw_heads, name in ((query, raw_q, "q_layernorm"), (key, raw_k, "k_layernorm")):
            norm = Qwen3RMSNorm(head_dim, eps=cfg.norm_epsilon)
            norm.weight.copy_(params[f"{name}.weight"])
            torch.testing.assert_close(ours, norm(raw_heads), rtol=0, atol=1e-6)


@pytest.mark.usefixtures("megatron_single_process")
def test_attention_bias_is_on_qkv_only() -> None:
    cfg, model = build("tiny-glm4-moe")
    params = _layer_params(model)
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels
    assert params["linear_qkv.bias"].shape == (qkv_rows,)
    assert "linear_proj.bias" not in params
    assert "linear_qkv.bias" not in _layer_params(build("tiny-qwen3-moe")[1])


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("normalize", (True, False))
def test_softmax_routing_equals_qwen3_moe_router(normalize: bool) -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    base = preset("tiny-qwen3-moe")
    cfg, model = build("tiny-qwen3-moe", moe=dataclasses.replace(base.moe, normalize_topk=normalize))
    router = next(layer.mlp.router for layer in model.decoder.layers if layer.is_moe_layer)
    hf = Qwen3MoeTopKRouter(
        transformers.Qwen3MoeConfig(
            hidden_size=cfg.hidden_size,
            num_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            norm_topk_prob=normalize,
        )
    )
    model.eval()
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
        hf.weight.copy_(router.weight)
        hidden = torch.randn(16, 1, cfg.hidden_size)
        probs, routing_map = router(hidden)
        _, weights, experts = hf(hidden.reshape(16, cfg.hidden_size))
    expected = torch.zeros_like(probs).scatter(1, experts, weights)
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    sums = probs.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums)) == normalize


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize(
    ("moe_changes", "pattern"),
    [
        ({}, [1, 0, 1]),
        ({"dense_layers": None, "first_k_dense": 2}, [0, 0, 1]),
        ({"dense_layers": [2, 0]}, [0, 1, 0]),
    ],
)
def test_dense_layers_place_the_mlps(moe_changes: dict[str, Any], pattern: list[int]) -> None:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    moe = dataclasses.replace(preset("tiny-qwen3-moe").moe, **moe_changes)
    cfg, model = build("tiny-qwen3-moe", moe=moe)
    assert cfg.moe_layer_pattern() == pattern
    assert [int(isinstance(layer.mlp, MoELayer)) for layer in model.decoder.layers] == pattern


def test_dense_layers_from_dict() -> None:
    data = dataclasses.asdict(preset("tiny-qwen3-moe"))
    data["moe"]["dense_layers"] = [0]
    data["llama3_rope"] = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}  # fmt: skip
    cfg = ModelConfig.from_dict(data)
    assert cfg.moe_layer_pattern() == [0, 1, 1]
    assert cfg.llama3_rope == Llama3RopeConfig(8.0, 1.0, 4.0, 64)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def _moe(**changes: Any) -> MoEConfig:
    return dataclasses.replace(preset("tiny-qwen3-moe").moe, **changes)


REFUSED = [
    ("tiny-qwen3-moe", {"moe": _moe(first_k_dense=1)}, "moe.dense_layers", "not both"),
    ("tiny-qwen3-moe", {"moe": _moe(dense_layers=[3])}, "moe.dense_layers", "layer 3 is not in [0"),
    ("tiny-qwen3-moe", {"moe": _moe(dense_layers=[1, 1])}, "moe.dense_layers", "repeats"),
    ("tiny-qwen3-moe", {"moe": _moe(dense_layers=[True])}, "moe.dense_layers", "list of layer indices"),
    ("tiny-qwen3-moe", {"moe": _moe(top_k=1)}, "moe.normalize_topk", "top_k=1"),
    (
        "tiny-glm4-moe",
        {"moe": dataclasses.replace(preset("tiny-glm4-moe").moe, normalize_topk=False)},
        "moe.normalize_topk",
        "always renormalises",
    ),
    (
        "tiny-glm4-moe",
        {"moe": dataclasses.replace(preset("tiny-glm4-moe").moe, top_k=1, topk_groups=1)},
        "moe.normalize_topk",
        "top_k=1",
    ),
    ("tiny-llama3", {"position_embedding": "learned"}, "llama3_rope", "needs position_embedding 'rope'"),
    ("tiny-mla-moe", {"llama3_rope": Llama3RopeConfig(8.0, 1.0, 4.0, 64)}, "llama3_rope", "no mla"),
    (
        "tiny-llama3",
        {"llama3_rope": Llama3RopeConfig(8.0, 4.0, 4.0, 64)},
        "llama3_rope.high_freq_factor",
        "must be > low_freq_factor",
    ),
    ("tiny-llama3", {"llama3_rope": Llama3RopeConfig(0.0, 1.0, 4.0, 64)}, "llama3_rope.factor", "> 0"),
    ("tiny-mla-moe", {"qk_layernorm": True}, "qk_layernorm", "MLA"),
    ("tiny-mla-moe", {"attention_bias": True}, "attention_bias", "MLA"),
    ("tiny-glm4-moe", {"rotary_percent": 0.3}, "rotary_percent", "4.8 channels"),
    ("tiny-glm4-moe", {"rotary_percent": 0.0625}, "rotary_percent", "1 channels; must be an even"),
]


@pytest.mark.parametrize(("name", "changes", "key", "reason"), REFUSED)
def test_refused_combinations(name: str, changes: dict[str, Any], key: str, reason: str) -> None:
    cfg = dataclasses.replace(preset(name), **changes)
    with pytest.raises(ModelConfigError) as err:
        cfg.validate()
    assert err.value.key == key
    assert reason in err.value.reason


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("name", ("tiny-qwen3-moe", "tiny-glm4-moe"))
def test_unnormalised_top1_builds(name: str) -> None:
    """A top-1 router that keeps the expert's own score is what Megatron computes."""
    moe = dataclasses.replace(preset(name).moe, top_k=1, normalize_topk=False)
    build(name, moe=moe)


@pytest.mark.usefixtures("megatron_single_process")
def test_tied_embeddings_single_stage() -> None:
    _, model = build("tiny-qwen3")
    assert model.output_layer.weight is None
    assert model.shared_embedding_or_output_weight() is model.embedding.word_embeddings.weight


def _tied_pipeline_rank(checkpoint_dir: str) -> dict[str, Any]:
    """One PP2 rank: the fresh model's copies of the tied weight agree across stages, then the
    saved weights' packed log-probs (from the last stage)."""
    from megatron_prefpack.platform import distributed as dist_platform
    from tests.test_model_parallel_equivalence import _packed_logprobs

    dist_platform.initialize(pipeline_parallel=2)
    _, model = build("tiny-qwen3")
    weight = model.shared_embedding_or_output_weight().detach().clone()
    first = weight.clone()
    torch.distributed.broadcast(first, src=0)
    dist_platform.destroy(keep_process_group=True)
    return {
        "copies_equal": torch.equal(weight, first) and bool(weight.abs().sum() > 0),
        "logprobs": _packed_logprobs("tiny-qwen3", checkpoint_dir, {"pipeline_parallel": 2}, {}),
    }


@pytest.mark.slow
def test_tied_embeddings_under_pipeline_parallelism(tmp_path: Any) -> None:
    from tests.distributed import run_distributed
    from tests.test_model_parallel_equivalence import _reference

    reference = _reference("tiny-qwen3", str(tmp_path))
    results = run_distributed(_tied_pipeline_rank, 2, str(tmp_path), timeout=90)
    assert all(r["copies_equal"] for r in results)
    packed = [r["logprobs"] for r in results if r["logprobs"] is not None]
    assert len(packed) == 1 and packed[0].keys() == reference.keys()
    for key, ref in reference.items():
        assert (packed[0][key] - ref).abs().max().item() <= 1e-5, key


@pytest.mark.usefixtures("megatron_single_process")
def test_features_change_the_output() -> None:
    """Each feature is live: turning it off changes a response's log-probs."""
    for name, off in (
        ("tiny-llama3", {"llama3_rope": None}),
        ("tiny-qwen3", {"qk_layernorm": False}),
        ("tiny-glm4-moe", {"rotary_percent": 1.0}),
    ):
        group = make_groups(seed=6, vocab_size=96, num_groups=1)[0]
        outputs = []
        for changes in ({}, off):
            _, model = build(name, init_method_std=0.3, **changes)
            model.eval()
            with torch.no_grad():
                outputs.append(single_token_logprobs(model, group, 0))
        assert (outputs[0] - outputs[1]).abs().max() > 1e-4, name
