"""Attention backends against the reference and the reference against unpacked attention (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_prefpack.attention import BackendUnavailableError, cp_positions, dense_mask, get_backend
from megatron_prefpack.attention.backends import resolve_backend_name
from megatron_prefpack.attention.plans import build_varlen_plan
from megatron_prefpack.data import layout
from megatron_prefpack.data.layout import PackedRow, build_row, token_views

ROW = 48


def random_row(rng: np.random.Generator, length: int, fill: bool) -> PackedRow:
    """Groups with K = 1..3 responses and prompts of 1..7 tokens (prefix 0..6), then pad or a filler group."""
    placements, used, group_id = [], 0, 0
    while True:
        prompt = rng.integers(1, 100, size=int(rng.integers(1, 8)))
        responses = [
            (k, rng.integers(1, 100, size=int(rng.integers(1, 7)))) for k in range(int(rng.integers(1, 4)))
        ]
        need = len(prompt) - 1 + sum(1 + len(r) for _, r in responses)
        if used + need > length - 3:
            break
        placements.append((group_id, prompt, responses))
        used, group_id = used + need, group_id + 1
    if fill:  # one-token prompt (empty prefix), one response filling the row
        placements.append(
            (group_id, rng.integers(1, 100, size=1), [(0, rng.integers(1, 100, size=length - used - 1))])
        )
    return build_row(placements, length, pad_id=0)


def random_views(
    seed: int, batch: int = 2, length: int = ROW, fill: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    views = [token_views(random_row(rng, length, fill)) for _ in range(batch)]
    doc = torch.from_numpy(np.stack([v.doc_ids for v in views]))
    seg = torch.from_numpy(np.stack([v.segment_ids for v in views]))
    return doc, seg


def random_qkv(
    seed: int,
    batch: int,
    num_q: int,
    num_k: int,
    heads: int = 4,
    kv_heads: int = 2,
    dqk: int = 8,
    dv: int = 6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_q, heads, dqk, generator=gen)
    k = torch.randn(batch, num_k, kv_heads, dqk, generator=gen)
    v = torch.randn(batch, num_k, kv_heads, dv, generator=gen)
    return q, k, v


def placement_mask(row: PackedRow) -> np.ndarray:
    """The allowed (query, key) pairs built from the placements, independently of the views."""
    allowed = np.eye(row.length, dtype=bool)
    for group in row.groups:
        prefix = range(group.prefix_start, group.prefix_start + group.prefix_length)
        for i in prefix:
            allowed[i, group.prefix_start : i + 1] = True
        for seg in group.segments:
            for i in range(seg.start, seg.end):
                allowed[i, list(prefix)] = True
                allowed[i, seg.start : i + 1] = True
    return allowed


@pytest.mark.parametrize("seed", range(5))
def test_mask_follows_placements_and_numpy_agrees(seed: int) -> None:
    row = random_row(np.random.default_rng(seed), ROW, fill=seed % 2 == 0)
    views = token_views(row)
    expected = placement_mask(row)
    np.testing.assert_array_equal(layout.dense_mask(views.doc_ids, views.segment_ids), expected)
    torch_mask = dense_mask(torch.from_numpy(views.doc_ids)[None], torch.from_numpy(views.segment_ids)[None])
    np.testing.assert_array_equal(torch_mask[0].numpy(), expected)


def test_dense_mask_query_subset_selects_rows() -> None:
    doc, seg = random_views(0)
    q_index = cp_positions(ROW, 2, 1)
    torch.testing.assert_close(
        dense_mask(doc, seg, q_index), dense_mask(doc, seg)[:, q_index], rtol=0, atol=0
    )


@pytest.mark.parametrize("fill", [False, True])
def test_reference_equals_unpacked_causal_attention(fill: bool) -> None:
    rng = np.random.default_rng(7)
    row = random_row(rng, ROW, fill)
    views = token_views(row)
    q, k, v = random_qkv(1, 1, ROW, ROW)
    backend = get_backend("reference")
    plan = backend.build_plan(
        torch.from_numpy(views.doc_ids)[None], torch.from_numpy(views.segment_ids)[None]
    )
    packed = backend.attend(q, k, v, plan, 0.3)[0]
    for group in row.groups:
        prefix = list(range(group.prefix_start, group.prefix_start + group.prefix_length))
        for seg in group.segments:
            idx = torch.tensor(prefix + list(range(seg.start, seg.end)))
            qs, ks, vs = (t[0, idx].transpose(0, 1) for t in (q, k, v))
            ks, vs = ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0)
            alone = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.3).transpose(0, 1)
            torch.testing.assert_close(packed[idx], alone)
    pads = torch.from_numpy(views.doc_ids == layout.PAD_DOC)
    torch.testing.assert_close(packed[pads], v[0, pads].repeat_interleave(2, 1))


@pytest.mark.parametrize("backend_name", ["varlen", "varlen:loop"])
@pytest.mark.parametrize(
    ("seed", "fill", "cp"), [(0, False, None), (1, True, None), (2, False, (2, 0)), (3, True, (2, 1))]
)
def test_varlen_equals_reference_forward_and_backward(
    backend_name: str, seed: int, fill: bool, cp: tuple[int, int] | None
) -> None:
    doc, seg = random_views(seed, fill=fill)
    q_index = None if cp is None else cp_positions(ROW, *cp)
    num_q = ROW if q_index is None else int(q_index.numel())
    inputs = random_qkv(seed, 2, num_q, ROW)
    out_grad = torch.randn(2, num_q, 4, 6, generator=torch.Generator().manual_seed(seed))
    results = []
    for name in ("reference", backend_name):
        backend = get_backend(name)
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = backend.attend(q, k, v, backend.build_plan(doc, seg, q_index), 0.25)
        out.backward(out_grad)
        results.append((out, q.grad, k.grad, v.grad))
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_varlen_plan_computes_exactly_the_allowed_pairs() -> None:
    doc, seg = random_views(4)
    plan = build_varlen_plan(doc, seg)
    lengths_q = plan.cu_seqlens_q.diff().long()
    lengths_k = plan.cu_seqlens_k.diff().long()
    # bottom-right causal pairs of each sequence: sum over its queries of (Lk - Lq + i + 1)
    pairs = int((lengths_q * (lengths_k - lengths_q) + lengths_q * (lengths_q + 1) // 2).sum())
    num_pad = int((doc == layout.PAD_DOC).sum())
    assert pairs + num_pad == int(dense_mask(doc, seg).sum())
    assert plan.q_gather is not None and int(plan.q_gather.numel()) + num_pad == doc.numel()


def test_varlen_plan_without_pad_keeps_query_order() -> None:
    doc, seg = random_views(5, fill=True)
    plan = build_varlen_plan(doc, seg)
    assert plan.q_gather is None and plan.output_index is None and plan.pad_kv.numel() == 0
    assert int(plan.cu_seqlens_q[-1]) == doc.numel()


@pytest.mark.slow
def test_flex_compiled_forward_equals_reference() -> None:
    """One compile (~30 s on CPU): queries of a CP rank, so the mask_mod's position lookup is exercised."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    doc, seg = random_views(6)
    q_index = cp_positions(ROW, 2, 1)
    q, k, v = random_qkv(6, 2, int(q_index.numel()), ROW, dqk=16, dv=8)
    reference, flex = get_backend("reference"), get_backend("flex")
    with torch.no_grad():
        expected = reference.attend(q, k, v, reference.build_plan(doc, seg, q_index), 0.25)
        actual = flex.attend(q, k, v, flex.build_plan(doc, seg, q_index), 0.25)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error messages")
@pytest.mark.parametrize(
    ("name", "hint"), [("varlen:flash_attn", "CUDA"), ("varlen:te", "CUDA"), ("varlen:torch", "CUDA")]
)
def test_gpu_kernel_without_cuda_raises_clear_error(name: str, hint: str) -> None:
    with pytest.raises(BackendUnavailableError, match=hint):
        get_backend(name)


def test_missing_kernel_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_prefpack.attention.backends import varlen

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(varlen, "kernel_importable", lambda kernel: False)
    with pytest.raises(BackendUnavailableError, match="pip install flash-attn --no-build-isolation"):
        varlen.VarlenBackend("flash_attn")
    with pytest.raises(BackendUnavailableError, match="transformer-engine"):
        varlen.VarlenBackend("te")


def test_backend_names() -> None:
    assert resolve_backend_name("auto", "cpu") == "reference"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("sdpa")


GPU_BACKENDS = ["varlen:flash_attn", "varlen:te", "varlen:torch", "flex"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize(("dqk", "dv"), [(64, 64), (192, 128)], ids=["gqa", "mla"])
def test_gpu_backend_in_bf16_matches_fp32_reference(name: str, dqk: int, dv: int) -> None:
    """bf16 forward and backward of a GPU kernel against the fp32 reference, on CUDA, under CP
    query subsets too: relative (Frobenius) error within bf16 rounding."""
    try:
        backend = get_backend(name, "cuda")
    except BackendUnavailableError as err:
        pytest.skip(str(err))
    length = 256
    doc, seg = random_views(7, batch=2, length=length, fill=True)
    reference = get_backend("reference")
    for q_index in (None, cp_positions(length, 2, 1)):
        num_q = length if q_index is None else int(q_index.numel())
        inputs = random_qkv(7, 2, num_q, length, heads=8, kv_heads=2, dqk=dqk, dv=dv)
        grad = torch.randn(2, num_q, 8, dv, generator=torch.Generator().manual_seed(8))
        results = []
        for impl, dtype in ((reference, torch.float32), (backend, torch.bfloat16)):
            q, k, v = (t.to("cuda", dtype).requires_grad_() for t in inputs)
            plan = impl.build_plan(doc.cuda(), seg.cuda(), None if q_index is None else q_index.cuda())
            out = impl.attend(q, k, v, plan, dqk**-0.5)
            out.backward(grad.to("cuda", dtype))
            results.append([t.float() for t in (out, q.grad, k.grad, v.grad)])
        for what, expected, actual in zip(("out", "dq", "dk", "dv"), *results, strict=True):
            error = float((actual - expected).norm() / expected.norm())
            assert error < 2e-2, f"{name} {what}: relative error {error:.2e}"
