"""FlexAttention backend: a BlockMask whose ``mask_mod`` is ``layout.may_attend`` on the views.

Always runs the compiled ``flex_attention`` (the eager one is a slow reference). On CPU,
torch supports only the forward pass (no backward); on CUDA both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from megatron_prefpack.attention.backends.base import AttentionBackend, BackendUnavailableError, check_shapes
from megatron_prefpack.attention.masks import query_positions
from megatron_prefpack.data.layout import may_attend


def flex_importable() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention``."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class FlexBackend(AttentionBackend):
    """Plan: a ``torch.nn.attention.flex_attention.BlockMask`` for ``(B, Sq, S)``."""

    name = "flex"

    def __init__(self) -> None:
        if not flex_importable():
            raise BackendUnavailableError(
                "FlexAttention needs torch >= 2.5 (torch.nn.attention.flex_attention)"
            )

    def build_plan(
        self, doc_ids: torch.Tensor, segment_ids: torch.Tensor, q_index: torch.Tensor | None = None
    ) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        batch, seq = doc_ids.shape
        q_pos = query_positions(seq, q_index, doc_ids.device)

        def mask_mod(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            pos = q_pos[q_idx]
            return may_attend(
                pos, kv_idx, doc_ids[b, pos], doc_ids[b, kv_idx], segment_ids[b, pos], segment_ids[b, kv_idx]
            )

        # Compiling the block-mask construction avoids materialising (B, Sq, S) on the GPU.
        return create_block_mask(
            mask_mod, batch, None, int(q_pos.numel()), seq, device=doc_ids.device, _compile=doc_ids.is_cuda
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any, softmax_scale: float
    ) -> torch.Tensor:
        check_shapes(q, k, v)
        out = _compiled_flex_attention()(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=plan,
            scale=softmax_scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)
