"""Multi-response supervised fine-tuning: NLL over every response of every group.

A group's K responses are all targets (e.g. Think-Fusion's mode-overlap data: one prompt
answered once with ``<think>...</think>`` reasoning and once without), each computed once
against the shared prompt by preference packing.

Two reductions over the global batch:

* ``"token"`` (default): total NLL of all response tokens / number of response tokens, so
  long responses weigh in proportion to their length (ordinary SFT);
* ``"response"``: mean over responses of each response's per-token NLL, so every response
  counts the same whatever its length.

Mode weights (``objective.sft.response_weights = [w_0, w_1, ...]``, e.g. ``[1.0, 0.5]`` for
thinking answer 0 and plain answer 1): response ``k``'s numerator term is multiplied by
``w_k`` and the denominator stays the unweighted count, so the loss is
``sum_n w_k(n) * l_n / C`` with ``l_n`` the term above and ``C`` the global batch's response
tokens (``token``) or responses (``response``); weights are not renormalised (all 1 = no
weights). The trainer then logs ``loss/response_k`` = ``sum_{n: k(n) = k} l_n / C_k``, the
unweighted loss of index ``k`` over its own tokens or responses ``C_k``.
"""

from __future__ import annotations

import torch

SFT_REDUCTIONS = ("token", "response")


def sft_response_losses(
    response_logp_sums: torch.Tensor, response_num_tokens: torch.Tensor, reduction: str = "token"
) -> torch.Tensor:
    """Each response's contribution to the loss numerator, ``(N,)`` float32.

    ``reduction="token"``: ``-sum_t log p`` (divide the total by the global token count);
    ``reduction="response"``: ``-sum_t log p / num_tokens`` (divide by the global response count).
    ``response_logp_sums`` are full (not CP-partial) sums; ``response_num_tokens`` is int, > 0.
    """
    if reduction == "token":
        return -response_logp_sums
    if reduction == "response":
        return -response_logp_sums / response_num_tokens.to(response_logp_sums.dtype)
    raise ValueError(f"SFT reduction must be one of {SFT_REDUCTIONS}, got {reduction!r}")
