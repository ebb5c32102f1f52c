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

Rewards reported per pair are ``beta * (pi - ref)`` of the quantities the loss used (SimPO:
``beta * avg``), detached: the trainer logs their means, accuracy (chosen > rejected) and margin.

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

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


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
    """Weight of the chosen response's per-token NLL (RPO); ``None`` disables it."""
    length_normalize: bool | None = None
    """Use per-token average log-probs instead of sums; ``None``: the loss type's convention
    (on for ``ipo``, as TRL; off for the others). ``simpo`` always averages."""

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

    @property
    def normalizes_length(self) -> bool:
        """Whether the log-ratios are divided by the token counts (``length_normalize`` resolved)."""
        return self.loss_type == "ipo" if self.length_normalize is None else self.length_normalize

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (every type but SimPO)."""
        return self.loss_type != "simpo"


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
    chosen_num_tokens = chosen_num_tokens.to(policy_chosen.dtype)
    rejected_num_tokens = rejected_num_tokens.to(policy_chosen.dtype)
    eps = config.label_smoothing
    beta = config.beta

    if config.loss_type == "simpo":
        chosen_rewards = beta * policy_chosen / chosen_num_tokens
        rejected_rewards = beta * policy_rejected / rejected_num_tokens
        logits = chosen_rewards - rejected_rewards - config.simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    else:
        if reference_chosen is None or reference_rejected is None:
            raise ValueError(f"loss_type {config.loss_type!r} needs reference log-probs")
        chosen_ratio = policy_chosen - reference_chosen
        rejected_ratio = policy_rejected - reference_rejected
        if config.normalizes_length:
            chosen_ratio = chosen_ratio / chosen_num_tokens
            rejected_ratio = rejected_ratio / rejected_num_tokens
        chosen_rewards = beta * chosen_ratio
        rejected_rewards = beta * rejected_ratio
        z = chosen_ratio - rejected_ratio
        if config.loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
        elif config.loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
        elif config.loss_type == "hinge":
            losses = torch.relu(1 - beta * z)
        else:  # ipo
            losses = (z - 1 / (2 * beta)) ** 2

    if config.rpo_alpha is not None:
        losses = losses - config.rpo_alpha * policy_chosen / chosen_num_tokens
    return DPOOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())
