"""Per-token log-probs from vocab-parallel logits and per-response sums over packed rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_prefpack.data.layout import build_row, token_views
from megatron_prefpack.losses.logprobs import (
    allreduce_response_sums,
    length_normalized,
    response_logprob_sums,
    response_logprobs,
    response_token_counts,
    token_logprobs,
)
from tests.distributed import run_distributed

VOCAB = 12


def _reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _packed_row() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, list]:
    """Two groups (2 and 3 responses) and padding in a 24-token row, as tensors (1, L)."""
    row = build_row(
        [
            (7, np.array([1, 2, 3]), [(0, np.array([4, 5])), (1, np.array([6, 7, 8]))]),
            (9, np.array([2, 9]), [(0, np.array([3])), (1, np.array([10, 11])), (2, np.array([5, 4]))]),
        ],
        row_length=24,
        pad_id=0,
    )
    views = token_views(row)
    tokens = torch.from_numpy(row.tokens)[None]
    labels = torch.from_numpy(row.labels)[None]
    slots = torch.from_numpy(views.response_slots)[None]
    segments = [seg for group in row.groups for seg in group.segments]
    return tokens, labels, slots, len(views.responses), segments


def test_token_logprobs_single_process_matches_log_softmax_in_both_layouts() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (3, 5), generator=gen)
    expected = _reference_logprobs(logits, labels)
    got_bsv = token_logprobs(logits.clone(), labels)
    got_sbv = token_logprobs(logits.transpose(0, 1).contiguous(), labels.t().contiguous())
    assert got_bsv.dtype == torch.float32
    torch.testing.assert_close(got_bsv.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_sbv.t().double(), expected, rtol=0, atol=1e-5)
    got_bf16 = token_logprobs(logits.bfloat16(), labels)
    torch.testing.assert_close(got_bf16.double(), _reference_logprobs(logits.bfloat16().float(), labels))


def test_token_logprobs_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match labels"):
        token_logprobs(torch.zeros(2, 3, VOCAB), torch.zeros(3, 2, dtype=torch.long))


def _tp_worker(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple:
    """Each TP rank gets its vocabulary shard; returns (log-probs, grad of the shard)."""
    from megatron.core import parallel_state

    from megatron_prefpack.platform.distributed import initialize

    initialize(tensor_parallel=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = logits.chunk(2, dim=-1)[rank].clone().requires_grad_(True)
    logps = token_logprobs(shard, labels)
    (logps * weights).sum().backward()
    return logps.detach(), shard.grad


def test_vocab_parallel_tp2_matches_single_process_log_softmax_and_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, VOCAB, generator=gen, dtype=torch.float64).float()
    labels = torch.randint(0, VOCAB, (2, 6), generator=gen)
    weights = torch.randn(2, 6, generator=gen)
    full = logits.clone().requires_grad_(True)
    expected = torch.log_softmax(full, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (expected * weights).sum().backward()

    (logps0, grad0), (logps1, grad1) = run_distributed(_tp_worker, 2, logits, labels, weights)
    torch.testing.assert_close(logps0, expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logps1, expected.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([grad0, grad1], dim=-1), full.grad, rtol=0, atol=1e-5)


def test_response_sums_and_counts_match_a_naive_loop_over_segments() -> None:
    tokens, labels, slots, num_responses, segments = _packed_row()
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, tokens.shape[1], VOCAB, generator=gen)
    token_logps = _reference_logprobs(logits, labels).float()

    naive = torch.zeros(num_responses)
    for n, seg in enumerate(segments):
        for t in range(seg.start, seg.start + seg.num_response_tokens):
            naive[n] += token_logps[0, t]
    # Positions outside responses must not leak in, whatever they hold.
    poisoned = token_logps.masked_fill(slots < 0, float("nan"))
    torch.testing.assert_close(response_logprob_sums(poisoned, slots, num_responses), naive)
    torch.testing.assert_close(response_logprobs(logits.clone(), labels, slots, num_responses), naive)

    counts = response_token_counts(slots, num_responses)
    assert counts.tolist() == [seg.num_response_tokens for seg in segments]
    torch.testing.assert_close(length_normalized(naive, counts), naive / counts.float())


def test_response_sums_are_differentiable_per_token() -> None:
    _, _, slots, num_responses, segments = _packed_row()
    token_logps = torch.zeros(slots.shape, requires_grad=True)
    response_weights = torch.arange(1.0, num_responses + 1)
    (response_logprob_sums(token_logps, slots, num_responses) * response_weights).sum().backward()
    expected = torch.zeros(slots.shape)
    for n, seg in enumerate(segments):
        expected[0, seg.start : seg.start + seg.num_response_tokens] = response_weights[n]
    torch.testing.assert_close(token_logps.grad, expected)


def test_response_sums_reject_out_of_range_slots_and_empty_normalisation() -> None:
    slots = torch.tensor([[0, 1, 2, -1]])
    with pytest.raises(ValueError, match="reference response 2 of 2"):
        response_logprob_sums(torch.zeros(1, 4), slots, 2)
    with pytest.raises(ValueError, match="at least one token"):
        length_normalized(torch.zeros(2), torch.tensor([3, 0]))


def _cp_worker(token_logps: torch.Tensor, slots: torch.Tensor, num_responses: int) -> tuple:
    """Each CP rank holds half of the row; returns (full sums, grad of its token log-probs)."""
    from megatron.core import parallel_state

    from megatron_prefpack.platform.distributed import initialize

    initialize(context_parallel=2)
    rank = parallel_state.get_context_parallel_rank()
    local = token_logps.chunk(2, dim=1)[rank].clone().requires_grad_(True)
    partial = response_logprob_sums(local, slots.chunk(2, dim=1)[rank], num_responses)
    full = allreduce_response_sums(partial, parallel_state.get_context_parallel_group())
    (full * torch.arange(1.0, num_responses + 1)).sum().backward()
    return full.detach(), local.grad


def test_cp_partial_sums_allreduce_to_full_sums_with_identity_backward() -> None:
    _, labels, slots, num_responses, _ = _packed_row()
    token_logps = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    expected = response_logprob_sums(token_logps, slots, num_responses)
    weights = torch.arange(1.0, num_responses + 1)
    expected_grad = torch.where(slots >= 0, weights[slots.clamp(min=0)], torch.zeros(()))

    (full0, grad0), (full1, grad1) = run_distributed(_cp_worker, 2, token_logps, slots, num_responses)
    torch.testing.assert_close(full0, expected)
    torch.testing.assert_close(full1, expected)
    torch.testing.assert_close(torch.cat([grad0, grad1], dim=1), expected_grad)


def test_allreduce_without_group_is_identity() -> None:
    sums = torch.tensor([1.0, 2.0])
    assert allreduce_response_sums(sums, None) is sums
