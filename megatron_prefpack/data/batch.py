"""Collating packed rows into a batch of torch tensors plus per-response and per-group arrays."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.layout import NO_RESPONSE, GroupPlacement, PackedRow, token_views

GroupLookup = Mapping[int, TokenizedGroup] | Callable[[int], TokenizedGroup]
"""``group_id -> TokenizedGroup``, as a mapping or a callable."""


@dataclass
class RowBatch:
    """B rows of length L with the layout metadata the model and the losses consume.

    Per token, (B, L) int64 unless noted: ``tokens``, ``labels``, ``loss_mask`` (bool),
    ``position_ids``, ``doc_ids`` and ``segment_ids`` (per row, as in ``layout.token_views``),
    ``response_slots`` (index into the batch's N responses, ``layout.NO_RESPONSE`` where no
    loss).

    Per response, (N,) in row order then placement order: ``response_group_ids``,
    ``response_indices`` (index within the group), ``response_scores`` (float32, NaN when
    the group has none), ``response_num_tokens`` (loss tokens), ``response_group_slots``
    (index into the G group arrays).

    Per group, (G,) in order of first appearance: ``group_ids``, ``group_margins``
    (float32, NaN when none). ``placements``: per row, its ``GroupPlacement`` tuple.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    segment_ids: torch.Tensor
    response_slots: torch.Tensor
    response_group_ids: torch.Tensor
    response_indices: torch.Tensor
    response_scores: torch.Tensor
    response_num_tokens: torch.Tensor
    response_group_slots: torch.Tensor
    group_ids: torch.Tensor
    group_margins: torch.Tensor
    placements: tuple[tuple[GroupPlacement, ...], ...]

    @property
    def num_responses(self) -> int:
        return int(self.response_group_ids.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RowBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


def _lookup(groups: GroupLookup) -> Callable[[int], TokenizedGroup]:
    return groups.__getitem__ if isinstance(groups, Mapping) else groups


def collate(rows: list[PackedRow], groups: GroupLookup, pad_to_multiple: int | None = None) -> RowBatch:
    """Stack ``rows`` (all of one length) into a :class:`RowBatch`.

    ``groups`` supplies scores and margins by ``group_id``. With ``pad_to_multiple``, the
    batch is cut to the longest row's real tokens rounded up to that multiple (never longer
    than the rows): dynamic padding for length-sorted unpacked rows; pass
    ``packing.row_length_multiple(...)`` so the cut length still splits over TP/CP.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    lengths = {row.length for row in rows}
    if len(lengths) != 1:
        raise ValueError(f"rows differ in length: {sorted(lengths)}")
    length = lengths.pop()
    if pad_to_multiple is not None:
        longest = max(row.num_real_tokens for row in rows)
        length = min(length, max(1, math.ceil(longest / pad_to_multiple)) * pad_to_multiple)
    get_group = _lookup(groups)

    per_token: dict[str, list[np.ndarray]] = {
        k: [] for k in ("tokens", "labels", "loss_mask", "position_ids", "doc_ids", "segment_ids")
    }
    slots: list[np.ndarray] = []
    resp_gid: list[int] = []
    resp_idx: list[int] = []
    resp_score: list[float] = []
    resp_ntok: list[int] = []
    resp_gslot: list[int] = []
    seen: dict[int, TokenizedGroup] = {}
    group_slot: dict[int, int] = {}
    margins: list[float] = []
    for row in rows:
        views = token_views(row)
        for name, arr in (
            ("tokens", row.tokens),
            ("labels", row.labels),
            ("loss_mask", row.loss_mask),
            ("position_ids", row.position_ids),
            ("doc_ids", views.doc_ids),
            ("segment_ids", views.segment_ids),
        ):
            per_token[name].append(arr[:length])
        row_slots = views.response_slots[:length].copy()
        row_slots[row_slots != NO_RESPONSE] += len(resp_gid)
        slots.append(row_slots)
        segments = [seg for placement in row.groups for seg in placement.segments]
        for (gid, k), seg in zip(views.responses, segments, strict=True):
            group = seen.get(gid)
            if group is None:
                group = seen[gid] = get_group(gid)
                group_slot[gid] = len(group_slot)
                margins.append(math.nan if group.margin is None else float(group.margin))
            resp_gid.append(gid)
            resp_idx.append(k)
            resp_score.append(math.nan if group.scores is None else float(group.scores[k]))
            resp_ntok.append(seg.num_response_tokens)
            resp_gslot.append(group_slot[gid])

    def stack(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays))

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)

    def floats(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32)

    return RowBatch(
        tokens=stack(per_token["tokens"]),
        labels=stack(per_token["labels"]),
        loss_mask=stack(per_token["loss_mask"]),
        position_ids=stack(per_token["position_ids"]),
        doc_ids=stack(per_token["doc_ids"]),
        segment_ids=stack(per_token["segment_ids"]),
        response_slots=stack(slots),
        response_group_ids=ints(resp_gid),
        response_indices=ints(resp_idx),
        response_scores=floats(resp_score),
        response_num_tokens=ints(resp_ntok),
        response_group_slots=ints(resp_gslot),
        group_ids=ints(list(group_slot)),
        group_margins=floats(margins),
        placements=tuple(row.groups for row in rows),
    )
