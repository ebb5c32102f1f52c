"""The interface every attention backend implements, and helpers they share.

A backend computes prefix-shared attention, flash-attn style:
``attend(q, k, v, plan, softmax_scale) -> out`` with ``q`` ``(B, Sq, Hq, Dqk)``,
``k`` ``(B, S, Hkv, Dqk)``, ``v`` ``(B, S, Hkv, Dv)`` and ``out`` ``(B, Sq, Hq, Dv)``.
``Hq`` is a multiple of ``Hkv`` (query head ``h`` uses key/value head ``h // (Hq // Hkv)``).
``plan`` comes from the same backend's ``build_plan(doc_ids, segment_ids, q_index)`` on the
rows' ``(B, S)`` views; ``q_index`` ``(Sq,)`` lists the row positions of the queries (all
``S`` positions unless context parallelism gave this rank only some). All backends compute
the same function: the rule of ``layout.may_attend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class BackendUnavailableError(RuntimeError):
    """An attention backend was asked for but cannot run here; the message says how to fix it."""


class AttentionBackend(ABC):
    """One way of computing prefix-shared attention (see the module docstring)."""

    name: str

    @abstractmethod
    def build_plan(
        self, doc_ids: torch.Tensor, segment_ids: torch.Tensor, q_index: torch.Tensor | None = None
    ) -> Any:
        """Precompute what ``attend`` needs for rows with these ``(B, S)`` views."""

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any, softmax_scale: float
    ) -> torch.Tensor:
        """Attention output ``(B, Sq, Hq, Dv)``."""


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``q``, ``k``, ``v`` have the shapes ``attend`` accepts."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, S, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"inconsistent q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch, "
            "key length and heads of k and v, and q/k head dim must agree"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def expand_kv_heads(t: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat key/value heads (dim -2) so each query head has its own: ``(..., Hkv, D) -> (..., Hq, D)``."""
    repeats = num_q_heads // t.shape[-2]
    return t if repeats == 1 else t.repeat_interleave(repeats, dim=-2)
