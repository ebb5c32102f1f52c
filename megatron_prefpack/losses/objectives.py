"""From a micro-batch and the model's output to a loss contribution and metric sums.

Each objective defines a *unit* and a loss per unit:

* DPO (:class:`DPOObjective`), by ``DPOConfig.ranking``: ``pair`` (default): a pair, chosen =
  ``response_index 0`` and rejected = ``response_index 1`` of the same group (further responses
  are not used); ``all_pairs`` and ``plackett_luce``: a group with at least one strictly
  ordered pair of scores (``dpo.ranking_dpo_losses``);
* reward model (:class:`RewardObjective`): a group with at least one strictly ordered pair of
  scores, its loss the mean over its ordered pairs (``reward.ranking_group_losses``);
* SFT (:class:`SFTObjective`): a response token (``reduction="token"``) or a response
  (``reduction="response"``), optionally weighted by its index in the group.

Scaling contract: the trainer first counts the units of the whole global batch (sum of
``objective.count(batch)`` over all micro-batches and data-parallel ranks) and passes that
``global_count`` to every call; the returned ``loss`` is ``sum of unit losses / global_count``,
so summing the micro-batches' losses over micro-batches and DP ranks (gradients included)
gives the mean over the global batch. Megatron's own scaling of the loss-function output
(division by the number of micro-batches, gradient averaging over DP) must be undone by the
trainer.

Metrics: ``metrics`` are detached per-micro-batch *sums* over the units (``count`` the local
units): the trainer adds them over micro-batches and ranks and divides by the total count. A
metric ``count/<name>`` is instead the number of units ``<name>`` is summed over (e.g. SFT's
``loss/response_1`` over the tokens of responses 1): divide ``<name>`` by it. ``metric_keys``
lists every metric an objective returns, fixed for a run. Names follow TRL's ``DPOTrainer``
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/*``, ``logits/*``, ``nll_loss``); in the group units (DPO rankings, reward models) a
group's value is the mean over its ordered pairs, winner as chosen and loser as rejected.

Context parallelism: pass the CP group; per-response sums (log-probs, and a reward model's
rewards read at each response's EOS token on whichever rank holds it) are all-reduced over it
(identity backward), so every CP rank returns the same loss and metrics and back-propagates
into its own tokens; count them once (e.g. on CP rank 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_prefpack.data.batch import RowBatch
from megatron_prefpack.losses.dpo import DPOConfig, dpo_losses, log_ratios, ranking_dpo_losses, rpo_nll
from megatron_prefpack.losses.logprobs import (
    allreduce_response_sums,
    response_logit_sums,
    response_logprobs,
    vocab_size,
)
from megatron_prefpack.losses.ranking import RankedPairs, ranked_pairs
from megatron_prefpack.losses.reward import ranking_group_losses, response_end_rewards
from megatron_prefpack.losses.sft import SFT_REDUCTIONS, sft_response_losses

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
"""What preference objectives log about the implicit (DPO) or predicted (RM) rewards."""

DPO_METRICS = ("loss", *REWARD_METRICS, "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
"""A DPO run's metrics; ``nll_loss`` (the chosen/best response's per-token NLL) joins with RPO."""


@dataclass
class ObjectiveOutput:
    """``loss``: scalar to back-propagate (already divided by the global count);
    ``metrics``: name -> detached scalar sum over this micro-batch's units; ``count``: units here."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    count: int


class Objective(Protocol):
    """What the trainer calls; ``output`` is the model's forward output for ``batch``."""

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The keys of every call's ``metrics`` (fixed for a run)."""
        ...

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


def _pair_units(batch: RowBatch) -> RankedPairs:
    """:func:`dpo_pairs` as ranked pairs whose every pair is its own unit (ascending group id)."""
    chosen, rejected = dpo_pairs(batch)
    group_ids = batch.response_group_ids[chosen]
    order = torch.argsort(group_ids)
    units = torch.arange(order.numel(), device=order.device)
    return RankedPairs(chosen[order], rejected[order], units, group_ids[order])


def _reward_metrics(pairs: RankedPairs, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """:data:`REWARD_METRICS` summed over the units of ``pairs`` (each unit's mean over its
    pairs) from every response's detached reward ``(N,)``."""
    chosen, rejected = rewards[pairs.winners], rewards[pairs.losers]
    return dict(
        zip(
            REWARD_METRICS,
            (
                pairs.group_means(values.float()).sum()
                for values in (chosen, rejected, chosen > rejected, chosen - rejected)
            ),
            strict=True,
        )
    )


@dataclass
class DPOObjective:
    """DPO-family objective; ``output`` is the vocab-parallel logits ``(B, L, V/TP)`` (consumed).

    ``reference_logps``: ``(N,)`` reference log-prob sums aligned with the batch's responses
    (offline from the stored file or from the frozen model); not read by SimPO. With
    ``config.ranking`` other than ``pair`` the scores (``batch.response_scores``) order each
    group's responses and every response of a group must be in the micro-batch (packing keeps
    groups whole).

    ``logits/chosen`` (``/rejected``) is the mean logit over the response's loss tokens and
    the model's whole (padded) vocabulary, averaged over the units; TRL pools the tokens of a
    device's batch instead, so the two differ when lengths vary.
    """

    config: DPOConfig
    cp_group: torch.distributed.ProcessGroup | None = None

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return DPO_METRICS + (("nll_loss",) if self.config.rpo_alpha is not None else ())

    def count(self, batch: RowBatch) -> int:
        if self.config.ranking == "pair":
            return int(dpo_pairs(batch)[0].numel())
        return ranked_pairs(batch.response_group_ids, batch.response_scores).num_groups

    def _reference(
        self, batch: RowBatch, reference_logps: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        if not self.config.needs_reference:
            return None
        if reference_logps is None:
            raise ValueError(f"DPO loss_type {self.config.loss_type!r} needs reference_logps")
        if reference_logps.shape != (batch.num_responses,):
            raise ValueError(
                f"reference_logps has shape {tuple(reference_logps.shape)}, expected ({batch.num_responses},)"
            )
        return reference_logps.to(device, torch.float32)

    def __call__(
        self,
        batch: RowBatch,
        output: torch.Tensor,
        global_count: int,
        reference_logps: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        num = batch.num_responses
        logit_sums = response_logit_sums(output, batch.response_slots, num)  # before output is consumed
        vocab = vocab_size(output)
        policy = response_logprobs(output, batch.labels, batch.response_slots, num)
        policy, logit_sums = allreduce_response_sums(torch.cat([policy, logit_sums]), self.cp_group).split(
            num
        )
        ref = self._reference(batch, reference_logps, policy.device)
        num_tokens = batch.response_num_tokens.to(policy.device)
        config = self.config
        if config.ranking == "pair":
            pairs = _pair_units(batch)
            w, lo = pairs.winners, pairs.losers
            out = dpo_losses(
                config,
                policy[w],
                policy[lo],
                None if ref is None else ref[w],
                None if ref is None else ref[lo],
                num_tokens[w],
                num_tokens[lo],
            )
            losses = out.losses
            rewards = config.beta * log_ratios(config, policy.detach(), ref, num_tokens)
            best_nll = rpo_nll(policy[w].detach(), num_tokens[w]) if config.rpo_alpha is not None else None
        else:
            device = policy.device
            ranked = ranking_dpo_losses(
                config,
                policy,
                ref,
                num_tokens,
                batch.response_group_ids.to(device),
                batch.response_scores.to(device),
            )
            losses, rewards, pairs, best_nll = ranked.losses, ranked.rewards, ranked.pairs, ranked.best_nll
        count = pairs.num_groups
        _check_global_count(count, global_count)
        mean_logits = logit_sums / (num_tokens.to(logit_sums.dtype) * vocab)
        policy = policy.detach()
        metrics = {"loss": losses.detach().sum(), **_reward_metrics(pairs, rewards)}
        for side, index in (("chosen", pairs.winners), ("rejected", pairs.losers)):
            metrics[f"logps/{side}"] = pairs.group_means(policy[index]).sum()
            metrics[f"logits/{side}"] = pairs.group_means(mean_logits[index]).sum()
        if best_nll is not None:
            metrics["nll_loss"] = best_nll.sum()
        return ObjectiveOutput(losses.sum() / global_count, metrics, count)


@dataclass
class RewardObjective:
    """Reward-model objective; ``output`` is the per-token rewards ``(B, L, 1)`` (``(B, L/CP, 1)``
    for this CP rank's share under context parallelism, with ``cp_group``) of a model whose
    output layer is a ``reward.RewardHead``."""

    center_coefficient: float = 0.0
    cp_group: torch.distributed.ProcessGroup | None = None

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return ("loss", *REWARD_METRICS)

    def count(self, batch: RowBatch) -> int:
        return ranked_pairs(batch.response_group_ids, batch.response_scores).num_groups

    def __call__(
        self,
        batch: RowBatch,
        output: torch.Tensor,
        global_count: int,
        reference_logps: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        rewards = response_end_rewards(output, batch, self.cp_group)
        device = rewards.device
        margins = batch.group_margins.to(device)[batch.response_group_slots.to(device)]
        group_losses, pairs = ranking_group_losses(
            rewards,
            batch.response_group_ids.to(device),
            batch.response_scores.to(device),
            margins=margins,
            center_coefficient=self.center_coefficient,
        )
        count = pairs.num_groups
        _check_global_count(count, global_count)
        metrics = {"loss": group_losses.detach().sum(), **_reward_metrics(pairs, rewards.detach())}
        return ObjectiveOutput(group_losses.sum() / global_count, metrics, count)


@dataclass
class SFTObjective:
    """Multi-response SFT; ``output`` is the vocab-parallel logits ``(B, L, V/TP)`` (consumed).

    ``first_only`` trains on each group's response 0 only (e.g. the chosen side of pairs).
    ``response_weights`` multiplies the loss of each group's response ``k`` by weight ``k``
    (``sft.sft_response_losses`` then ``* weight``; the global count stays the unweighted
    tokens or responses); a response whose index has no weight is an error. With weights,
    ``loss/response_<k>`` logs the unweighted loss of index ``k`` alone, a mean over its own
    units (``count/loss/response_<k>``).
    """

    reduction: str = "token"
    first_only: bool = False
    cp_group: torch.distributed.ProcessGroup | None = None
    response_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.reduction not in SFT_REDUCTIONS:
            raise ValueError(f"SFT reduction must be one of {SFT_REDUCTIONS}, got {self.reduction!r}")
        weights = self.response_weights
        if weights is not None:
            if self.first_only:
                raise ValueError(
                    "objective.sft.response_weights needs every response trained (responses: all)"
                )
            if not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(
                    f"objective.sft.response_weights must be finite numbers >= 0, got {list(weights)}"
                )

    @property
    def metric_keys(self) -> tuple[str, ...]:
        per_index = [
            (f"loss/response_{k}", f"count/loss/response_{k}")
            for k in range(len(self.response_weights or ()))
        ]
        return ("loss", *(key for keys in per_index for key in keys))

    def _selected(self, batch: RowBatch) -> torch.Tensor:
        if self.first_only:
            return batch.response_indices == 0
        return torch.ones_like(batch.response_indices, dtype=torch.bool)

    def _units(self, batch: RowBatch) -> torch.Tensor:
        """Units of each response ``(N,)`` int64: its tokens or 1, 0 when not trained."""
        units = (
            batch.response_num_tokens
            if self.reduction == "token"
            else torch.ones_like(batch.response_num_tokens)
        )
        return torch.where(self._selected(batch), units, 0)

    def _weights(self, batch: RowBatch) -> torch.Tensor | None:
        """Each response's weight ``(N,)`` float32, or None without ``response_weights``."""
        if self.response_weights is None:
            return None
        indices = batch.response_indices
        beyond = indices >= len(self.response_weights)
        if bool(beyond.any()):
            groups = sorted(set(batch.response_group_ids[beyond].tolist()))
            raise ValueError(
                f"objective.sft.response_weights has {len(self.response_weights)} weights, but groups "
                f"{groups} have a response with index {int(indices.max())}: give one weight per response"
            )
        return torch.tensor(self.response_weights, dtype=torch.float32, device=indices.device)[indices]

    def count(self, batch: RowBatch) -> int:
        self._weights(batch)
        return int(self._units(batch).sum())

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
        losses = torch.where(selected, sft_response_losses(policy, num_tokens, self.reduction), 0.0)
        weights = self._weights(batch)
        weighted = losses if weights is None else losses * weights.to(policy.device)
        metrics = {"loss": weighted.detach().sum()}
        if weights is not None:
            units = self._units(batch).to(policy.device)
            indices = batch.response_indices.to(policy.device)
            for k in range(len(self.response_weights)):
                mine = indices == k
                metrics[f"loss/response_{k}"] = losses.detach()[mine].sum()
                metrics[f"count/loss/response_{k}"] = units[mine].sum().float()
        return ObjectiveOutput(weighted.sum() / global_count, metrics, count)
