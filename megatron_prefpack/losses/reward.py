"""Reward models: a scalar head in GPTModel's ``output_layer`` slot and the ranking losses.

:class:`RewardHead` replaces the vocabulary projection, so GPTModel's "logits" become one
reward per token, ``(B, S, 1)`` after GPTModel's transpose, identical on every TP rank. A
response's reward is read at the last token of its segment (its EOS token, the position after
its last loss-carrying position), see :func:`response_end_rewards`; under context parallelism
each rank reads the ends it holds and the CP group adds them up.

Losses (per group, before the caller's reduction over groups): every ordered pair ``(i, j)`` of
responses of a group with ``score_i > score_j`` contributes
``-log s(r_i - r_j - margin) + c (r_i + r_j)^2`` and a group's loss is the mean over its pairs
(InstructGPT's K-response ranking; with K = 2 and scores ``[1, 0]`` it is Bradley-Terry, with
TRL's optional per-pair ``margin`` and ``center_rewards_coefficient`` c).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_prefpack.data.batch import RowBatch
from megatron_prefpack.data.layout import NO_RESPONSE, PREFIX_SEGMENT
from megatron_prefpack.losses.logprobs import allreduce_response_sums
from megatron_prefpack.losses.ranking import RankedPairs, ranked_pairs


class RewardHead(torch.nn.Module):
    """A bias-free ``hidden_size -> 1`` projection with GPTModel's output-layer call signature.

    ``forward(hidden_states (S or S/TP, B, H), weight=None, runtime_gather_output=None)``
    returns ``(rewards (S, B, 1), None)`` like ``ColumnParallelLinear`` returns
    ``(output, bias)``. ``weight`` (the tied embedding GPTModel would pass) and
    ``runtime_gather_output`` are ignored: the output is not vocab-sharded. Under sequence
    parallelism the head gathers the sequence first; its backward only splits the gradient
    (the computation after the gather is replicated on every TP rank, not partial), and the
    head's own weight gradient is complete on every TP rank, so it needs no TP reduction.

    The weight is ``(1, H)`` under the state-dict key ``output_layer.weight`` (replicated over TP
    in distributed checkpoints). Initialisation uses its own seeded generator so that every
    rank builds the same head: normal with std ``init_std`` (default ``1/sqrt(H + 1)``), or
    zeros for ``init_std=0``.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        sequence_parallel: bool = False,
        tp_group: torch.distributed.ProcessGroup | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        init_std: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        std = 1.0 / math.sqrt(hidden_size + 1) if init_std is None else init_std
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(1, hidden_size, generator=generator) * std
        self.weight = torch.nn.Parameter(weight.to(device=device, dtype=params_dtype))
        # GPTModel reads ``output_layer.sequence_parallel`` on some inference paths.
        self.sequence_parallel = sequence_parallel
        self.tp_group = tp_group

    def forward(
        self,
        hidden_states: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, None]:
        if self.sequence_parallel:
            group = (
                self.tp_group
                if self.tp_group is not None
                else parallel_state.get_tensor_model_parallel_group()
            )
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=group
            )
        return F.linear(hidden_states, self.weight), None


def attach_reward_head(model: torch.nn.Module, *, init_std: float | None = None, seed: int = 0) -> None:
    """Turn a built (unwrapped) GPTModel into a reward model, in place.

    Call it on every pipeline stage's model chunk, before wrapping in DDP / Float16Module and
    before building the optimizer. Every stage unties the embedding from the output layer (so no
    stage waits for the embedding-gradient all-reduce between first and last stage); the stage
    with ``post_process`` gets a fresh :class:`RewardHead` in ``output_layer``. Order with
    checkpoints: load a language-model checkpoint first, then attach (the LM head is dropped);
    to resume a reward model, attach first, then load (the head is ``output_layer.weight``).
    Multi-token prediction is refused: its loss needs vocabulary logits.
    """
    config = model.config
    if getattr(config, "mtp_num_layers", None):
        raise ValueError("a reward model cannot use multi-token prediction (mtp_num_layers > 0)")
    model.share_embeddings_and_output_weights = False
    if not model.post_process:
        return
    reference = next(model.parameters())
    model.output_layer = RewardHead(
        config.hidden_size,
        sequence_parallel=config.sequence_parallel,
        tp_group=model.tp_group,
        params_dtype=config.params_dtype,
        device=reference.device,
        init_std=init_std,
        seed=seed,
    )


def response_end_slots(batch: RowBatch) -> torch.Tensor:
    """Each response's EOS token as a per-token view: ``(B, L)`` int64 holding response ``n`` at
    the last token of its segment, ``NO_RESPONSE`` elsewhere (the per-token fields of ``batch``
    may be a context-parallel rank's share, :func:`~megatron_prefpack.models.forward.cp_local`).

    A segment's last token is the only segment token that carries no loss, so it is found
    without looking at its neighbours (which may sit on another CP rank); ``batch.placements``
    (never sharded) numbers the segments as ``collate`` numbered the responses: row, then
    placement, then segment.
    """
    firsts = torch.full(
        (len(batch.placements), max((len(row) for row in batch.placements), default=0)), -1, dtype=torch.long
    )
    n = 0
    for b, row in enumerate(batch.placements):
        for doc, placement in enumerate(row):
            firsts[b, doc] = n
            n += len(placement.segments)
    ends = (batch.segment_ids > PREFIX_SEGMENT) & (batch.response_slots == NO_RESPONSE)
    rows = torch.arange(ends.shape[0], device=ends.device)[:, None].expand_as(ends)
    slots = torch.full_like(batch.response_slots, NO_RESPONSE)
    first = firsts.to(ends.device)[rows[ends], batch.doc_ids[ends]]
    slots[ends] = first + batch.segment_ids[ends] - 1
    return slots


def response_end_rewards(
    token_rewards: torch.Tensor, batch: RowBatch, cp_group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor:
    """Each response's reward, read at its EOS token: ``(N,)`` float32, differentiable.

    ``token_rewards``: ``(B, L)`` or ``(B, L, 1)`` (GPTModel's output with a :class:`RewardHead`),
    aligned with ``batch``'s per-token fields. Under context parallelism pass the CP rank's
    share (``cp_local(batch)``) and the CP group: each rank reads the ends it holds, zero
    elsewhere, and the sum over the group (identity backward,
    :func:`~megatron_prefpack.losses.logprobs.allreduce_response_sums`) is every response's
    reward on every rank, its gradient flowing back to the one rank that holds the token.
    Raises unless every response has exactly one EOS token among the ranks.
    """
    if token_rewards.dim() == batch.response_slots.dim() + 1:
        token_rewards = token_rewards.squeeze(-1)
    if token_rewards.shape != batch.response_slots.shape:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)} do not match the batch's "
            f"{tuple(batch.response_slots.shape)} tokens"
        )
    num = batch.num_responses
    slots = response_end_slots(batch)
    ends = slots != NO_RESPONSE
    rewards = torch.zeros(num, dtype=torch.float32, device=token_rewards.device)
    rewards = rewards.index_add(0, slots[ends], token_rewards[ends].float())
    found = torch.bincount(slots[ends], minlength=num).to(rewards)
    both = allreduce_response_sums(torch.cat([rewards, found]), cp_group)
    if bool((both[num:] != 1).any()):
        missing = torch.nonzero(both[num:] != 1).flatten().tolist()
        raise ValueError(f"responses {missing} do not have exactly one EOS token in the batch")
    return both[:num]


def bradley_terry_losses(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """``-log sigmoid(r_chosen - r_rejected - margin)`` per pair, ``(P,)``."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def ranking_group_losses(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    scores: torch.Tensor,
    *,
    margins: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> tuple[torch.Tensor, RankedPairs]:
    """Per-group ranking losses from per-response rewards.

    ``rewards``, ``group_ids``, ``scores`` and the optional ``margins`` (the group's margin
    repeated on each of its responses; NaN = none) are ``(N,)``. Returns ``group_losses``
    ``(G,)`` over the ranked groups of ``pairs`` (those with at least one ordered pair, in
    ascending group id; groups whose responses all tie are left out) and ``pairs``.
    """
    pairs = ranked_pairs(group_ids, scores)
    winners, losers = pairs.winners, pairs.losers
    margin = None
    if margins is not None:
        margin = torch.nan_to_num(margins[winners].to(rewards.dtype), nan=0.0)
    pair_losses = bradley_terry_losses(rewards[winners], rewards[losers], margin)
    if center_coefficient:
        pair_losses = pair_losses + center_coefficient * (rewards[winners] + rewards[losers]) ** 2
    return pairs.group_means(pair_losses), pairs
