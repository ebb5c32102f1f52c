"""From a micro-batch and the model's output to a loss contribution and metric sums.

Each objective defines a *unit* and a loss per unit:

* DPO (:class:`DPOObjective`): a pair, chosen = ``response_index 0`` and rejected =
  ``response_index 1`` of the same group (further responses of a group are not used);
* reward model (:class:`RewardObjective`): a group with at least one strictly ordered pair of
  scores, its loss the mean over its ordered pairs (``reward.ranking_group_losses``);
* SFT (:class:`SFTObjective`): a response token (``reduction="token"``) or a response
  (``reduction="response"``).

Scaling contract: the trainer first counts the units of the whole global batch (sum of
``objective.count(batch)`` over all micro-batches and data-parallel ranks) and passes that
``global_count`` to every call; the returned ``loss`` is ``sum of unit losses / global_count``,
so summing the micro-batches' losses over micro-batches and DP ranks (gradients included)
gives the mean over the global batch. Megatron's own scaling of the loss-function output
(division by the number of micro-batches, gradient averaging over DP) must be undone by the
trainer. ``metrics`` are detached per-micro-batch *sums* (and ``count`` the local units): the
trainer adds them over micro-batches and ranks and divides by the total count.

Context parallelism (DPO, SFT): pass the CP group; per-response log-prob sums are
all-reduced over it (identity backward), so every CP rank returns the same loss and metrics
and back-propagates into its own tokens; count them once (e.g. on CP rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from megatron.core import parallel_state

from megatron_prefpack.data.batch import RowBatch
from megatron_prefpack.losses.dpo import DPOConfig, dpo_losses
from megatron_prefpack.losses.logprobs import allreduce_response_sums, response_logprobs
from megatron_prefpack.losses.reward import ranking_group_losses, ranking_pairs, response_end_rewards
from megatron_prefpack.losses.sft import SFT_REDUCTIONS, sft_response_losses


@dataclass
class ObjectiveOutput:
    """``loss``: scalar to back-propagate (already divided by the global count);
    ``metrics``: name -> detached scalar sum over this micro-batch's units; ``count``: units here."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    count: int


class Objective(Protocol):
    """What the trainer calls; ``output`` is the model's forward output for ``batch``."""

    def count(self, batch: RowBatch) -> int:
        """Units of this objective in ``batch`` (known before the forward pass)."""
        ...

    def __call__(
        self,
        batch: RowBatch,
        output: torch.Tensor,
        global_count: int,
        reference_logps: torch.Tensor | None = None,
    ) -> ObjectiveOutput: ...


def _check_global_count(count: int, global_count: int) -> None:
    if global_count <= 0 or count > global_count:
        raise ValueError(f"global_count {global_count} must be positive and >= this micro-batch's {count}")


def dpo_pairs(batch: RowBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` response indices ``(P,)`` into the batch's responses.

    Raises if a group has response 0 without response 1 or the reverse (a group's responses
    must all be in the same micro-batch).
    """
    gids, ks = batch.response_group_ids, batch.response_indices
    match = (gids[:, None] == gids[None, :]) & (ks[:, None] == 0) & (ks[None, :] == 1)
    chosen, rejected = torch.nonzero(match, as_tuple=True)
    in_pairs = torch.zeros_like(ks, dtype=torch.bool)
    in_pairs[chosen] = True
    in_pairs[rejected] = True
    orphans = ~in_pairs & (ks <= 1)
    if bool(orphans.any()):
        raise ValueError(
            f"groups {sorted(set(gids[orphans].tolist()))} lack a chosen (0) or rejected (1) response "
            "in this micro-batch"
        )
    return chosen, rejected


@dataclass
class DPOObjective:
    """DPO-family objective; ``output`` is the vocab-parallel logits ``(B, L, V/TP)`` (consumed).

    ``reference_logps``: ``(N,)`` reference log-prob sums aligned with the batch's responses
    (offline from the stored file or from the frozen model); not read by SimPO.
    """

    config: DPOConfig
    cp_group: torch.distributed.ProcessGroup | None = None

    def count(self, batch: RowBatch) -> int:
        return int(dpo_pairs(batch)[0].numel())

    def __call__(
        self,
        batch: RowBatch,
        output: torch.Tensor,
        global_count: int,
        reference_logps: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        chosen, rejected = dpo_pairs(batch)
        _check_global_count(int(chosen.numel()), global_count)
        policy = response_logprobs(output, batch.labels, batch.response_slots, batch.num_responses)
        policy = allreduce_response_sums(policy, self.cp_group)
        if self.config.needs_reference:
            if reference_logps is None:
                raise ValueError(f"DPO loss_type {self.config.loss_type!r} needs reference_logps")
            if reference_logps.shape != (batch.num_responses,):
                raise ValueError(
                    f"reference_logps has shape {tuple(reference_logps.shape)}, expected ({batch.num_responses},)"
                )
            ref = reference_logps.to(policy.device, torch.float32)
            ref_chosen, ref_rejected = ref[chosen], ref[rejected]
        else:
            ref_chosen = ref_rejected = None
        num_tokens = batch.response_num_tokens.to(policy.device)
        out = dpo_losses(
            self.config,
            policy[chosen],
            policy[rejected],
            ref_chosen,
            ref_rejected,
            num_tokens[chosen],
            num_tokens[rejected],
        )
        metrics = {
            "loss": out.losses.detach().sum(),
            "rewards/chosen": out.chosen_rewards.sum(),
            "rewards/rejected": out.rejected_rewards.sum(),
            "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float().sum(),
            "rewards/margin": (out.chosen_rewards - out.rejected_rewards).sum(),
            "logps/chosen": policy[chosen].detach().sum(),
            "logps/rejected": policy[rejected].detach().sum(),
        }
        return ObjectiveOutput(out.losses.sum() / global_count, metrics, int(chosen.numel()))


@dataclass
class RewardObjective:
    """Reward-model objective; ``output`` is the per-token rewards ``(B, L, 1)`` of a model whose
    output layer is a ``reward.RewardHead``. Not available under context parallelism (a
    response's last token may sit on another CP rank)."""

    center_coefficient: float = 0.0

    def count(self, batch: RowBatch) -> int:
        winners, _ = ranking_pairs(batch.response_group_ids, batch.response_scores)
        return int(torch.unique(batch.response_group_ids[winners]).numel())

    def __call__(
        self,
        batch: RowBatch,
        output: torch.Tensor,
        global_count: int,
        reference_logps: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        if (
            parallel_state.model_parallel_is_initialized()
            and parallel_state.get_context_parallel_world_size() > 1
        ):
            raise ValueError("the reward-model objective does not support context parallelism")
        rewards = response_end_rewards(output, batch.response_slots, batch.num_responses)
        device = rewards.device
        margins = batch.group_margins.to(device)[batch.response_group_slots.to(device)]
        group_losses, winners, losers, pair_groups = ranking_group_losses(
            rewards,
            batch.response_group_ids.to(device),
            batch.response_scores.to(device),
            margins=margins,
            center_coefficient=self.center_coefficient,
        )
        count = int(group_losses.numel())
        _check_global_count(count, global_count)

        def per_group_mean(values: torch.Tensor) -> torch.Tensor:
            """Sum over groups of each group's mean over its pairs."""
            sums = torch.zeros(count, device=device).index_add(0, pair_groups, values.float())
            return (sums / torch.bincount(pair_groups, minlength=count)).sum()

        r_win, r_lose = rewards[winners].detach(), rewards[losers].detach()
        metrics = {
            "loss": group_losses.detach().sum(),
            "rewards/chosen": per_group_mean(r_win),
            "rewards/rejected": per_group_mean(r_lose),
            "rewards/accuracy": per_group_mean(r_win > r_lose),
            "rewards/margin": per_group_mean(r_win - r_lose),
        }
        return ObjectiveOutput(group_losses.sum() / global_count, metrics, count)


@dataclass
class SFTObjective:
    """Multi-response SFT; ``output`` is the vocab-parallel logits ``(B, L, V/TP)`` (consumed).

    ``first_only`` trains on each group's response 0 only (e.g. the chosen side of pairs).
    """

    reduction: str = "token"
    first_only: bool = False
    cp_group: torch.distributed.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.reduction not in SFT_REDUCTIONS:
            raise ValueError(f"SFT reduction must be one of {SFT_REDUCTIONS}, got {self.reduction!r}")

    def _selected(self, batch: RowBatch) -> torch.Tensor:
        if self.first_only:
            return batch.response_indices == 0
        return torch.ones_like(batch.response_indices, dtype=torch.bool)

    def count(self, batch: RowBatch) -> int:
        selected = self._selected(batch)
        if self.reduction == "token":
            return int(batch.response_num_tokens[selected].sum())
        return int(selected.sum())

    def __call__(
        self,
        batch: RowBatch,
        output: torch.Tensor,
        global_count: int,
        reference_logps: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        count = self.count(batch)
        _check_global_count(count, global_count)
        policy = response_logprobs(output, batch.labels, batch.response_slots, batch.num_responses)
        policy = allreduce_response_sums(policy, self.cp_group)
        selected = self._selected(batch).to(policy.device)
        num_tokens = batch.response_num_tokens.to(policy.device)
        losses = sft_response_losses(policy[selected], num_tokens[selected], self.reduction)
        metrics = {"loss": losses.detach().sum()}
        return ObjectiveOutput(losses.sum() / global_count, metrics, count)
