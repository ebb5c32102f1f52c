"""PrefixSharedAttention in Megatron's core_attention slot, PrefPackSeqParams, and context parallelism."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_prefpack.attention import PrefixSharedAttention, PrefPackSeqParams, get_backend
from tests.distributed import run_distributed
from tests.test_attention_backends import ROW, random_qkv, random_views

HEADS, KV_HEADS = 4, 2


def make_config(**overrides: object) -> TransformerConfig:
    values = {
        "num_layers": 1,
        "hidden_size": 32,
        "num_attention_heads": HEADS,
        "num_query_groups": KV_HEADS,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "use_cpu_initialization": True,
        "add_bias_linear": False,
    }
    values.update(overrides)
    return TransformerConfig(**values)


def make_attention(backend: str = "reference", **kwargs: object) -> PrefixSharedAttention:
    return PrefixSharedAttention(
        make_config(),
        layer_number=1,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        backend=backend,
        **kwargs,
    )


def to_sbhd(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(0, 1).contiguous() for t in tensors]


def make_params(seed: int, fill: bool = False, backend: str | None = None) -> PrefPackSeqParams:
    doc, seg = random_views(seed, fill=fill)
    positions = torch.arange(ROW).expand(2, ROW)
    return PrefPackSeqParams.from_views(doc, seg, positions, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "varlen"])
def test_module_in_sbhd_equals_direct_backend_call(backend: str) -> None:
    params = make_params(0)
    q, k, v = random_qkv(0, 2, ROW, ROW)
    module = make_attention(backend, softmax_scale=0.2, k_channels=8, v_channels=6)
    out = module(*to_sbhd(q, k, v), None, packed_seq_params=params)
    reference = get_backend("reference")
    expected = reference.attend(q, k, v, reference.build_plan(params.doc_ids, params.segment_ids), 0.2)
    assert out.shape == (ROW, 2, HEADS * 6)
    torch.testing.assert_close(out, expected.transpose(0, 1).reshape(ROW, 2, -1), rtol=1e-5, atol=1e-5)


def test_fallback_without_params_is_causal_attention_with_default_scale() -> None:
    q, k, v = random_qkv(1, 2, ROW, ROW, dqk=8, dv=8)
    module = make_attention("varlen")
    assert module.softmax_scale == pytest.approx(1 / math.sqrt(32 // HEADS))
    out = module(*to_sbhd(q, k, v), None)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(2, 2).transpose(1, 2),
        v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True,
        scale=module.softmax_scale,
    )
    torch.testing.assert_close(out, expected.permute(2, 0, 1, 3).reshape(ROW, 2, -1), rtol=1e-5, atol=1e-5)
    # decoding: the last 3 queries against the whole cache see everything up to themselves
    tail = module(*to_sbhd(q[:, -3:], k, v), None)
    torch.testing.assert_close(tail, out[-3:], rtol=1e-5, atol=1e-5)


def test_params_plan_is_built_once_and_reused() -> None:
    params = make_params(2, backend="varlen")
    backend = get_backend("varlen")
    assert list(params.plans) == [("varlen", 1, 0, None)]
    plan = params.plan(backend)
    q, k, v = random_qkv(2, 2, ROW, ROW)
    make_attention("varlen")(*to_sbhd(q, k, v), None, packed_seq_params=params)
    assert params.plan(backend) is plan and len(params.plans) == 1


def test_params_fields_seen_by_megatron() -> None:
    doc, seg = random_views(3)
    batch = SimpleNamespace(doc_ids=doc, segment_ids=seg, position_ids=torch.arange(ROW).expand(2, ROW))
    params = PrefPackSeqParams.from_batch(batch)
    assert isinstance(params, PackedSeqParams)
    assert params.qkv_format == "sbhd" and params.cu_seqlens_q is None
    assert params.max_seqlen_q == params.max_seqlen_kv == ROW
    assert params.local_position_ids(2, 1).tolist()[0] == list(range(12, 24)) + list(range(24, 36))


def test_params_reject_bad_views() -> None:
    doc, seg = random_views(3)
    with pytest.raises(ValueError, match=r"position_ids must be a \(B, S\) int64"):
        PrefPackSeqParams.from_views(doc, seg, torch.zeros(2, ROW, dtype=torch.int32))
    with pytest.raises(ValueError, match="qkv_format='sbhd'"):
        PrefPackSeqParams(qkv_format="thd", doc_ids=doc, segment_ids=seg, position_ids=doc)


def test_module_refuses_unsupported_settings() -> None:
    with pytest.raises(ValueError, match="attention_dropout=0"):
        PrefixSharedAttention(make_config(attention_dropout=0.1), 1, AttnMaskType.causal, "self")
    q, k, v = random_qkv(4, 2, ROW, ROW)
    thd = PackedSeqParams(qkv_format="thd")
    with pytest.raises(TypeError, match="needs PrefPackSeqParams"):
        make_attention()(*to_sbhd(q, k, v), None, packed_seq_params=thd)


def _self_attention_invariant_worker(backend: str) -> float:
    """Packed SelfAttention (no RoPE) equals the same layer on each group's unpacked sequences."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_prefpack.data.layout import build_row, token_views
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize()
    submodules = SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear,
        core_attention=ModuleSpec(module=PrefixSharedAttention, params={"backend": backend}),
        linear_proj=RowParallelLinear,
    )
    layer = SelfAttention(make_config(), submodules, layer_number=1, attn_mask_type=AttnMaskType.causal)
    prompts = [torch.arange(1, 6), torch.arange(10, 11)]
    responses = [[torch.arange(20, 23), torch.arange(30, 34)], [torch.arange(40, 42)]]
    row = build_row(
        [
            (g, p.numpy(), [(k, r.numpy()) for k, r in enumerate(rs)])
            for g, (p, rs) in enumerate(zip(prompts, responses, strict=True))
        ],
        24,
        pad_id=0,
    )
    views = token_views(row)
    embed = torch.nn.Embedding(64, 32)
    params = PrefPackSeqParams.from_views(
        torch.from_numpy(views.doc_ids)[None],
        torch.from_numpy(views.segment_ids)[None],
        torch.from_numpy(row.position_ids)[None],
    )
    with torch.no_grad():
        packed, _ = layer(embed(torch.from_numpy(row.tokens))[:, None], None, packed_seq_params=params)
        worst = 0.0
        for group, prompt, group_responses in zip(row.groups, prompts, responses, strict=True):
            for seg, response in zip(group.segments, group_responses, strict=True):
                alone, _ = layer(embed(torch.cat([prompt, response]))[:, None], None)
                packed_rows = list(range(group.prefix_start, group.prefix_start + group.prefix_length))
                packed_rows += list(range(seg.start, seg.end))
                worst = max(worst, float((packed[packed_rows] - alone[: len(packed_rows)]).abs().max()))
    return worst


@pytest.mark.slow
def test_megatron_self_attention_packed_equals_unpacked() -> None:
    assert run_distributed(_self_attention_invariant_worker, 1, "varlen")[0] < 1e-5


CP_CASES = [("reference", True), ("varlen", True), ("varlen", False)]
"""(backend, with PrefPackSeqParams) cases of the context-parallel test; False = causal fallback."""


def _attention_and_grads(
    backend: str, with_params: bool, cp_size: int, cp_rank: int
) -> dict[str, torch.Tensor]:
    """Output and q/k/v grads of this CP rank's shard (the whole rows when ``cp_size == 1``)."""
    from megatron_prefpack.attention import shard_for_cp

    params = make_params(8) if with_params else None
    full = [t.transpose(0, 1) for t in random_qkv(8, 2, ROW, ROW)]
    out_grad = torch.randn(ROW, 2, HEADS * 6, generator=torch.Generator().manual_seed(9))
    local = [shard_for_cp(t, 0, cp_size, cp_rank).requires_grad_() for t in full]
    out = make_attention(backend)(*local, None, packed_seq_params=params)
    out.backward(shard_for_cp(out_grad, 0, cp_size, cp_rank))
    return {"out": out.detach(), "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad}


def _context_parallel_worker() -> list[dict[str, torch.Tensor]]:
    """One CP=2 rank: checks the shard layout against Megatron's, then runs every case."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_prefpack.attention import cp_positions
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(context_parallel=2)
    rank = parallel_state.get_context_parallel_rank()
    # megatron-core 0.19 added a required is_hybrid_cp argument
    extra = (
        {"is_hybrid_cp": False}
        if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
        else {}
    )
    megatron_shard = get_batch_on_this_cp_rank({"positions": torch.arange(ROW)[None]}, **extra)["positions"][
        0
    ]
    assert megatron_shard.tolist() == cp_positions(ROW, 2, rank).tolist()
    return [_attention_and_grads(backend, with_params, 2, rank) for backend, with_params in CP_CASES]


@pytest.mark.slow
def test_context_parallel_2_equals_single_rank() -> None:
    from megatron_prefpack.attention import shard_for_cp

    ranks = run_distributed(_context_parallel_worker, 2)
    for case_index, case in enumerate(CP_CASES):
        full = _attention_and_grads(*case, 1, 0)
        for rank, results in enumerate(ranks):
            for name, value in results[case_index].items():
                expected = shard_for_cp(full[name], 0, 2, rank)
                torch.testing.assert_close(
                    value, expected, rtol=1e-5, atol=1e-5, msg=lambda m, c=case, n=name: f"{c} {n}: {m}"
                )
