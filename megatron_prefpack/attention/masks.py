"""Dense boolean attention masks from the per-token layout views (torch).

This is the only torch implementation of the mask; it evaluates
:func:`megatron_prefpack.data.layout.may_attend`, the rule the numpy ``layout.dense_mask``
and the FlexAttention ``mask_mod`` evaluate too.
"""

from __future__ import annotations

import torch

from megatron_prefpack.data.layout import may_attend


def query_positions(num_queries: int, q_index: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Row positions of the queries: ``q_index`` if given, else ``0 .. num_queries-1`` (int64)."""
    if q_index is None:
        return torch.arange(num_queries, device=device)
    return q_index.to(device=device, dtype=torch.long)


def dense_mask(
    doc_ids: torch.Tensor, segment_ids: torch.Tensor, q_index: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``(B, Sq, S)`` boolean mask (True = may attend) of rows with views ``(B, S)``.

    ``q_index`` (``(Sq,)`` int64, default all ``S`` positions) selects the query positions, as
    under context parallelism where a rank holds only some of the row's queries; keys are
    always the whole row.
    """
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    q_pos = query_positions(doc_ids.shape[1], q_index, doc_ids.device)
    q_doc, q_seg = doc_ids[:, q_pos], segment_ids[:, q_pos]
    return may_attend(
        q_pos[None, :, None],
        positions[None, None, :],
        q_doc[:, :, None],
        doc_ids[:, None, :],
        q_seg[:, :, None],
        segment_ids[:, None, :],
    )
