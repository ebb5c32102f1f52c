"""Reward models: a scalar head in GPTModel's ``output_layer`` slot and the ranking losses.

:class:`RewardHead` replaces the vocabulary projection, so GPTModel's "logits" become one
reward per token, ``(B, S, 1)`` after GPTModel's transpose, identical on every TP rank. A
response's reward is read at the last token of its segment (its EOS token, the position after
its last loss-carrying position), see :func:`response_end_rewards`.

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

from megatron_prefpack.data.layout import NO_RESPONSE


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


def response_end_positions(response_slots: torch.Tensor, num_responses: int) -> torch.Tensor:
    """Flat index into ``response_slots.reshape(-1)`` of each response's last segment token, ``(N,)``.

    That token (the response's EOS) sits right after the response's last loss-carrying
    position, in the same row. Raises if a response has no position in ``response_slots``.
    """
    slots = response_slots.reshape(-1)
    selected = slots != NO_RESPONSE
    positions = torch.arange(slots.numel(), device=slots.device)
    last = torch.full((num_responses,), -1, dtype=torch.long, device=slots.device)
    last = last.scatter_reduce(0, slots[selected], positions[selected], reduce="amax")
    if bool((last < 0).any()):
        missing = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"responses {missing} have no loss-carrying position in response_slots")
    return last + 1


def response_end_rewards(
    token_rewards: torch.Tensor, response_slots: torch.Tensor, num_responses: int
) -> torch.Tensor:
    """Each response's reward, read at its EOS token: ``(N,)`` float32, differentiable.

    ``token_rewards``: ``(B, L)`` or ``(B, L, 1)`` (GPTModel's output with a :class:`RewardHead`);
    ``response_slots``: ``(B, L)``.
    """
    if token_rewards.dim() == response_slots.dim() + 1:
        token_rewards = token_rewards.squeeze(-1)
    if token_rewards.shape != response_slots.shape:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)} do not match response_slots {tuple(response_slots.shape)}"
        )
    ends = response_end_positions(response_slots, num_responses)
    return token_rewards.reshape(-1)[ends].float()


def ranking_pairs(group_ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs ``(winner, loser)`` of responses of one group with a higher score, ``(P,)`` each.

    ``group_ids`` (N,) int and ``scores`` (N,) float index the same responses. Ties give no
    pair. A NaN score raises: reward-model training needs a ranking for every response.
    """
    if bool(torch.isnan(scores).any()):
        groups = sorted(set(group_ids[torch.isnan(scores)].tolist()))
        raise ValueError(f"groups {groups} have responses without a score; reward models need scores")
    same_group = group_ids[:, None] == group_ids[None, :]
    better = scores[:, None] > scores[None, :]
    winners, losers = torch.nonzero(same_group & better, as_tuple=True)
    return winners, losers


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group ranking losses from per-response rewards.

    ``rewards``, ``group_ids``, ``scores`` and the optional ``margins`` (the group's margin
    repeated on each of its responses; NaN = none) are ``(N,)``. Returns
    ``(group_losses (G,), pair_winners (P,), pair_losers (P,), pair_groups (P,))``, where the G
    groups are those with at least one ordered pair, in ascending group id, and
    ``pair_groups`` indexes into them; groups whose responses all tie are left out.
    """
    winners, losers = ranking_pairs(group_ids, scores)
    margin = None
    if margins is not None:
        margin = torch.nan_to_num(margins[winners].to(rewards.dtype), nan=0.0)
    pair_losses = bradley_terry_losses(rewards[winners], rewards[losers], margin)
    if center_coefficient:
        pair_losses = pair_losses + center_coefficient * (rewards[winners] + rewards[losers]) ** 2
    _, pair_groups = torch.unique(group_ids[winners], return_inverse=True)
    num_groups = int(pair_groups.max()) + 1 if pair_groups.numel() else 0
    sums = torch.zeros(num_groups, dtype=pair_losses.dtype, device=pair_losses.device)
    sums = sums.index_add(0, pair_groups, pair_losses)
    counts = torch.bincount(pair_groups, minlength=num_groups).to(pair_losses.dtype)
    return sums / counts, winners, losers, pair_groups
