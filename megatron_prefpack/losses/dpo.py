"""The DPO family of pairwise preference losses.

All losses take per-pair log-probability *sums* of the chosen and rejected responses under
the policy and (except SimPO) the reference model, plus the responses' token counts, and
return per-pair losses; reduction over pairs is the caller's (see ``objectives``).

With ``z = (pi_c - ref_c) - (pi_r - ref_r)`` (each log-ratio divided by its response's token
count first when length-normalised: ``length_normalize``, by default on for ``ipo`` only),
``eps = label_smoothing``, ``beta = beta``:

* ``sigmoid`` (DPO, Rafailov et al. 2023; conservative DPO for ``eps > 0``):
  ``-(1 - eps) log s(beta z) - eps log s(-beta z)``;
* ``robust`` (Chowdhury et al. 2024, noise rate ``eps < 0.5``):
  ``(-(1 - eps) log s(beta z) + eps log s(-beta z)) / (1 - 2 eps)``;
* ``hinge`` (SLiC / RSO): ``max(0, 1 - beta z)``;
* ``ipo`` (Azar et al. 2023, ``beta`` is tau): ``(z - 1 / (2 beta))^2``, length-normalised by
  default as TRL's ``DPOTrainer`` does (the IPO authors' form; ``length_normalize: false``
  gives the paper's literal sums, whose square grows with the response length);
* ``simpo`` (Meng et al. 2024, reference-free, always length-normalised): with
  ``u = beta (avg_c - avg_r) - gamma``, ``-(1 - eps) log s(u) - eps log s(-u)``.

``rpo_alpha`` adds RPO's (Pang et al. 2024) length-normalised NLL of the chosen response,
``rpo_alpha * (-pi_c / |y_c|)``, to each pair's loss.

Groups of K > 2 responses (``ranking``, the order from the group's scores, higher = better;
pairs have scores ``[1, 0]``):

* ``pair`` (default): response 0 (chosen) against response 1 (rejected); further responses
  are not used; the unit is a pair;
* ``all_pairs``: every ordered pair ``(w, l)`` of a group with ``score_w > score_l`` (ties give
  no pair) gets the configured loss; a group's loss is the mean over its pairs, plus
  ``rpo_alpha`` times the NLL of the group's best response (the mean over the responses tied at
  the top score) once per group, not per pair; the unit is a group with at least one pair;
* ``plackett_luce`` (Rafailov et al. 2023, the Plackett-Luce form of DPO): with the group's
  responses ordered by descending score ``tau(1) .. tau(K)`` and ``u = beta * r`` (``r`` the
  log-ratio above, length-normalised when configured), a group's loss is
  ``-sum_{k=1}^{K} log(exp(u_tau(k)) / sum_{j>=k} exp(u_tau(j)))`` (+ the best response's RPO
  NLL). Only for ``loss_type: sigmoid`` without label smoothing (for K = 2 it is that loss
  exactly). It needs a strict order: a group with tied scores is refused, naming the group
  (``all_pairs`` skips ties instead); a group of one response has no order and is not a unit.

K = 2 with scores ``[1, 0]`` gives the ``pair`` losses exactly in both forms.

Rewards reported per response are ``beta * (pi - ref)`` of the quantities the loss used
(SimPO: ``beta * avg``), detached: the trainer logs their means, accuracy (chosen > rejected)
and margin (``objectives``).

Against TRL's ``DPOTrainer`` (read at commit f2cd577, 2026-07; log-prob sums over completion
tokens, EOS included, as here): ``sigmoid`` (eps = 0), ``hinge``, ``robust`` and ``ipo`` are its
losses. Deliberate differences: ``sigmoid`` with ``label_smoothing > 0`` is conservative DPO
here, while TRL's ``sigmoid`` ignores ``label_smoothing``; the logged rewards of a
length-normalised loss (``ipo`` by default) are per-token, while TRL logs ``beta`` times the
summed log-ratio for every loss type; ``simpo`` is TRL's ``CPOTrainer`` SimPO, not a
``DPOTrainer`` loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_prefpack.losses.ranking import RankedPairs, ranked_pairs

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
RANKINGS = ("pair", "all_pairs", "plackett_luce")


@dataclass(frozen=True)
class DPOConfig:
    """Hyper-parameters of the DPO-family loss (validated on construction)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    """``sigmoid``/``simpo``: conservative-DPO label noise; ``robust``: the noise rate epsilon."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (absolute, not gamma / beta)."""
    rpo_alpha: float | None = None
    """Weight of the chosen (best) response's per-token NLL (RPO); ``None`` disables it."""
    length_normalize: bool | None = None
    """Use per-token average log-probs instead of sums; ``None``: the loss type's convention
    (on for ``ipo``, as TRL; off for the others). ``simpo`` always averages."""
    ranking: str = "pair"
    """Which responses of a group are compared: ``pair`` (0 against 1), ``all_pairs`` or
    ``plackett_luce`` (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            raise ValueError(f"DPOConfig.label_smoothing has no meaning for loss_type {self.loss_type!r}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ValueError(f"DPOConfig.rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.ranking not in RANKINGS:
            raise ValueError(
                f"DPOConfig.ranking (objective.dpo.ranking) must be one of {RANKINGS}, got {self.ranking!r}"
            )
        if self.ranking == "plackett_luce" and (self.loss_type != "sigmoid" or self.label_smoothing):
            raise ValueError(
                "DPOConfig.ranking (objective.dpo.ranking) 'plackett_luce' is the listwise form of "
                f"the sigmoid loss without label smoothing; got loss_type {self.loss_type!r}, "
                f"label_smoothing {self.label_smoothing} (use ranking 'all_pairs' for the other losses)"
            )

    @property
    def normalizes_length(self) -> bool:
        """Whether the log-ratios are divided by the token counts (``length_normalize`` resolved)."""
        return self.loss_type == "ipo" if self.length_normalize is None else self.length_normalize

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (every type but SimPO)."""
        return self.loss_type != "simpo"


def log_ratios(
    config: DPOConfig, policy: torch.Tensor, reference: torch.Tensor | None, num_tokens: torch.Tensor
) -> torch.Tensor:
    """What the losses compare, per response ``(N,)``: ``policy - reference`` log-prob sums,
    divided by ``num_tokens`` when length-normalised; SimPO: ``policy / num_tokens``. Times
    ``beta`` it is the implicit reward. ``reference`` may be ``None`` only for SimPO."""
    num_tokens = num_tokens.to(policy.dtype)
    if config.loss_type == "simpo":
        return policy / num_tokens
    if reference is None:
        raise ValueError(f"loss_type {config.loss_type!r} needs reference log-probs")
    ratio = policy - reference
    return ratio / num_tokens if config.normalizes_length else ratio


def pair_losses(config: DPOConfig, z: torch.Tensor) -> torch.Tensor:
    """The configured loss of each pair from ``z`` = chosen minus rejected :func:`log_ratios`."""
    eps, beta = config.label_smoothing, config.beta
    if config.loss_type == "simpo":
        logits = beta * z - config.simpo_gamma
        return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    if config.loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    if config.loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    if config.loss_type == "hinge":
        return torch.relu(1 - beta * z)
    return (z - 1 / (2 * beta)) ** 2  # ipo


def rpo_nll(policy: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's term before ``rpo_alpha``: each response's per-token NLL ``-policy / num_tokens``."""
    return -policy / num_tokens.to(policy.dtype)


@dataclass
class DPOOutput:
    """Per-pair results, all ``(P,)`` float32. ``losses`` carries the graph; rewards are detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_losses(
    config: DPOConfig,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
) -> DPOOutput:
    """Per-pair DPO-family losses and implicit rewards.

    Inputs are ``(P,)``: log-prob sums (float) and response token counts (int, > 0). The
    reference sums may be ``None`` only when ``config.needs_reference`` is False.
    """
    chosen = log_ratios(config, policy_chosen, reference_chosen, chosen_num_tokens)
    rejected = log_ratios(config, policy_rejected, reference_rejected, rejected_num_tokens)
    losses = pair_losses(config, chosen - rejected)
    if config.rpo_alpha is not None:
        losses = losses + config.rpo_alpha * rpo_nll(policy_chosen, chosen_num_tokens)
    return DPOOutput(losses, config.beta * chosen.detach(), config.beta * rejected.detach())


def plackett_luce_losses(
    rewards: torch.Tensor, group_ids: torch.Tensor, scores: torch.Tensor, pairs: RankedPairs
) -> torch.Tensor:
    """Each ranked group's Plackett-Luce loss ``(G,)`` (the groups of ``pairs``) from the
    responses' implicit rewards ``(N,)`` (``beta`` times :func:`log_ratios`), ordered by their
    ``scores`` ``(N,)`` within each group (``group_ids`` ``(N,)``). Raises on tied scores."""
    same = group_ids[:, None] == group_ids[None, :]
    ties = same & (scores[:, None] == scores[None, :])
    ties.fill_diagonal_(False)
    if bool(ties.any()):
        tied = sorted(set(group_ids[ties.any(dim=1)].tolist()))
        raise ValueError(
            f"objective.dpo.ranking 'plackett_luce' needs a strict order of each group's scores, "
            f"but groups {tied} have tied responses (ranking 'all_pairs' skips ties)"
        )
    index = pairs.response_groups(group_ids)
    members = torch.nonzero(index >= 0).flatten()
    # Members in group order, best first within each group; rank = place within the group.
    members = members[torch.argsort(scores[members], descending=True, stable=True)]
    members = members[torch.argsort(index[members], stable=True)]
    groups = index[members]
    sizes = torch.bincount(groups, minlength=pairs.num_groups)
    rank = torch.arange(members.numel(), device=members.device) - (sizes.cumsum(0) - sizes)[groups]
    width = int(sizes.max()) if sizes.numel() else 0
    low = torch.finfo(rewards.dtype).min / 4  # a finite -inf: no NaN in logsumexp's backward
    table = torch.full((pairs.num_groups, width), low, dtype=rewards.dtype, device=rewards.device)
    table = table.index_put((groups, rank), rewards[members])
    valid = torch.zeros_like(table, dtype=torch.bool)
    valid[groups, rank] = True
    later = torch.ones(width, width, dtype=torch.bool, device=table.device).triu()  # [k, j]: j >= k
    rest = torch.where(later & valid[:, None, :], table[:, None, :], low)
    terms = torch.logsumexp(rest, dim=-1) - table  # -log(exp(u_k) / sum_{j>=k} exp(u_j))
    return torch.where(valid, terms, 0.0).sum(dim=1)


@dataclass
class RankingOutput:
    """Per-group results of :func:`ranking_dpo_losses`: ``losses`` ``(G,)`` carries the graph
    (the ranked groups of ``pairs``); ``rewards`` ``(N,)`` are every response's implicit
    reward, detached; ``best_nll`` ``(G,)``, detached, is each group's RPO term (``None``
    without ``rpo_alpha``)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    pairs: RankedPairs
    best_nll: torch.Tensor | None


def ranking_dpo_losses(
    config: DPOConfig,
    policy: torch.Tensor,
    reference: torch.Tensor | None,
    num_tokens: torch.Tensor,
    group_ids: torch.Tensor,
    scores: torch.Tensor,
) -> RankingOutput:
    """Group losses of ``config.ranking`` ``all_pairs`` or ``plackett_luce`` over a batch's
    responses: ``policy``/``reference`` log-prob sums, ``num_tokens``, ``group_ids`` and
    ``scores`` (higher = better), all ``(N,)``; every response of a group must be present."""
    if config.ranking not in ("all_pairs", "plackett_luce"):
        raise ValueError(
            f"ranking_dpo_losses needs ranking 'all_pairs' or 'plackett_luce', got {config.ranking!r}"
        )
    pairs = ranked_pairs(group_ids, scores)
    ratios = log_ratios(config, policy, reference, num_tokens)
    if config.ranking == "all_pairs":
        losses = pairs.group_means(pair_losses(config, ratios[pairs.winners] - ratios[pairs.losers]))
    else:
        losses = plackett_luce_losses(config.beta * ratios, group_ids, scores, pairs)
    best_nll = None
    if config.rpo_alpha is not None:
        index = pairs.response_groups(group_ids)
        ranked = index >= 0
        top = torch.full((pairs.num_groups,), -torch.inf, dtype=scores.dtype, device=scores.device)
        top = top.scatter_reduce(0, index[ranked], scores[ranked], reduce="amax")
        best = torch.nonzero(ranked).flatten()
        best = best[scores[best] == top[index[best]]]
        nll = torch.zeros_like(losses).index_add(0, index[best], rpo_nll(policy[best], num_tokens[best]))
        nll = nll / torch.bincount(index[best], minlength=pairs.num_groups).to(nll.dtype)
        losses = losses + config.rpo_alpha * nll
        best_nll = nll.detach()
    return RankingOutput(losses, config.beta * ratios.detach(), pairs, best_nll)
