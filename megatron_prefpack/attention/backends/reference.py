"""Reference backend: the dense boolean mask and torch SDPA. Runs anywhere; O(S^2) memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_prefpack.attention.backends.base import AttentionBackend, check_shapes, expand_kv_heads
from megatron_prefpack.attention.masks import dense_mask


class ReferenceBackend(AttentionBackend):
    """Plan: the ``(B, 1, Sq, S)`` mask of ``masks.dense_mask``."""

    name = "reference"

    def build_plan(
        self, doc_ids: torch.Tensor, segment_ids: torch.Tensor, q_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        return dense_mask(doc_ids, segment_ids, q_index)[:, None]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: torch.Tensor, softmax_scale: float
    ) -> torch.Tensor:
        check_shapes(q, k, v)
        num_heads = q.shape[2]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            expand_kv_heads(k, num_heads).transpose(1, 2),
            expand_kv_heads(v, num_heads).transpose(1, 2),
            attn_mask=plan,
            scale=softmax_scale,
        )
        return out.transpose(1, 2)
