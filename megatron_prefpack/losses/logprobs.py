"""Per-token and per-response log-probabilities from vocab-parallel logits.

The model's logits arrive as ``(..., V / TP)``: each tensor-parallel rank holds one contiguous
shard of the vocabulary (Megatron's ``ColumnParallelLinear`` output, ``parallel_output=True``).
:func:`token_logprobs` gets ``log p(label)`` through Megatron's
``vocab_parallel_cross_entropy``, which needs one float32 working copy of the local shard (none
at all for float32 logits, see below) and two small all-reduces over the TP group; a
full-vocabulary log-softmax is never gathered.

Per-response quantities then come from the row's ``response_slots`` view
(:func:`megatron_prefpack.data.layout.token_views`): position ``t`` with
``response_slots[t] = n >= 0`` predicts a token of response ``n``.

Context parallelism: when a row's tokens are split over the CP ranks, the sums computed here
are *partial* (each rank sees only its own tokens). The caller combines them with
:func:`allreduce_response_sums` before any non-linear loss; its backward is the identity, so
every CP rank back-propagates the gradient of the total into its own tokens and the CP ranks'
parameter gradients add up to the full gradient (as in Megatron's own CP loss handling, the
trainer must undo any averaging over CP in the data-parallel gradient reduction).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from megatron_prefpack.data.layout import NO_RESPONSE


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(labels)`` at every position, float32, shape ``labels.shape``.

    ``logits``: ``(..., V_local)`` with the leading dimensions equal to ``labels.shape`` (both
    ``(B, S)`` and ``(S, B)`` layouts work); when Megatron's model-parallel state is initialised
    ``V_local`` is this rank's vocabulary shard and the call is collective over the TP group,
    otherwise the logits must cover the whole vocabulary (one process, no TP).

    Like Megatron's loss, this consumes ``logits``: float32 logits are overwritten in place
    (lower-precision logits are first upcast to a fresh float32 copy). Pass a clone if the
    logits are needed afterwards. Labels outside the vocabulary give garbage at that position;
    only positions selected by ``response_slots`` are meant to be used.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    if parallel_state.model_parallel_is_initialized():
        return -vocab_parallel_cross_entropy(logits, labels)
    flat = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    return -flat.view(labels.shape)


def response_logprob_sums(
    token_logps: torch.Tensor, response_slots: torch.Tensor, num_responses: int
) -> torch.Tensor:
    """Sum ``token_logps`` over each response's positions: ``(N,)`` float32, differentiable.

    ``token_logps`` and ``response_slots`` have the same shape (any layout); ``response_slots``
    holds ``NO_RESPONSE`` (-1) or a response index in ``0 .. num_responses - 1``. Positions
    with ``NO_RESPONSE`` contribute nothing (whatever their value, including inf/NaN).
    """
    if token_logps.shape != response_slots.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} do not match response_slots {tuple(response_slots.shape)}"
        )
    slots = response_slots.reshape(-1)
    selected = slots != NO_RESPONSE
    if selected.any() and int(slots[selected].max()) >= num_responses:
        raise ValueError(f"response_slots reference response {int(slots.max())} of {num_responses}")
    sums = torch.zeros(num_responses, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, slots[selected], token_logps.reshape(-1)[selected].float())


def response_logit_sums(
    logits: torch.Tensor, response_slots: torch.Tensor, num_responses: int
) -> torch.Tensor:
    """Sum of the logits over the whole vocabulary and each response's positions: ``(N,)``
    float32, detached (a metric: TRL's ``logits/chosen`` is this over tokens x vocabulary).

    ``logits``: ``(..., V_local)`` as in :func:`token_logprobs` (read, not consumed: call this
    first); when Megatron's model-parallel state is initialised the vocabulary shards' sums are
    added over the TP group (collective). Under CP the result is partial like
    :func:`response_logprob_sums`'s. The full vocabulary size is :func:`vocab_size`.
    """
    with torch.no_grad():
        sums = response_logprob_sums(logits.sum(dim=-1, dtype=torch.float32), response_slots, num_responses)
        if vocab_size(logits) != logits.shape[-1]:
            torch.distributed.all_reduce(sums, group=parallel_state.get_tensor_model_parallel_group())
        return sums


def vocab_size(logits: torch.Tensor) -> int:
    """The full vocabulary of vocab-parallel ``logits`` ``(..., V_local)``: ``V_local`` times the
    TP size (Megatron's padded vocabulary, every output the model computes)."""
    tp = (
        parallel_state.get_tensor_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    return logits.shape[-1] * tp


def response_token_counts(response_slots: torch.Tensor, num_responses: int) -> torch.Tensor:
    """Loss-carrying positions per response visible in ``response_slots``: ``(N,)`` int64."""
    slots = response_slots.reshape(-1)
    return torch.bincount(slots[slots != NO_RESPONSE], minlength=num_responses)


def allreduce_response_sums(
    partial_sums: torch.Tensor, group: torch.distributed.ProcessGroup | None
) -> torch.Tensor:
    """Add per-response partial sums over ``group`` (the CP group); identity backward.

    Every rank gets the full sums; the gradient flowing back into each rank's partial sums is
    the gradient of the full sums (not multiplied by the group size). ``None`` or a group of
    one rank returns ``partial_sums`` unchanged.
    """
    if group is None or torch.distributed.get_world_size(group) == 1:
        return partial_sums
    return reduce_from_tensor_model_parallel_region(partial_sums, group=group)


def length_normalized(sums: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token average log-prob of each response: ``sums / num_tokens`` (``(N,)`` float32).

    ``num_tokens`` must be the response's full token count (e.g. ``RowBatch.response_num_tokens``),
    so under CP normalise only after :func:`allreduce_response_sums`.
    """
    if bool((num_tokens <= 0).any()):
        raise ValueError("every response needs at least one token to be length-normalised")
    return sums / num_tokens.to(sums.dtype)


def response_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    response_slots: torch.Tensor,
    num_responses: int,
) -> torch.Tensor:
    """:func:`token_logprobs` then :func:`response_logprob_sums`: ``(N,)`` per-response sums.

    Same layout and in-place contract as :func:`token_logprobs`. Under CP the result is partial.
    """
    return response_logprob_sums(token_logprobs(logits, labels), response_slots, num_responses)
