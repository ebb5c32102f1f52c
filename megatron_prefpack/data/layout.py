"""The packed-row layout: the contract every module of megatron-prefpack relies on.

A *group* is one prompt with K >= 1 responses. With prompt tokens ``p[0..P-1]`` and
response ``k`` tokens ``r_k[0..R_k-1]`` (EOS included), a group placed in a row occupies::

    shared prefix  p[0..P-2]              positions 0 .. P-2
    segment k      p[P-1], r_k[0..R_k-1]  positions P-1 .. P-1+R_k   (for each k)

The last prompt token is repeated at the head of every segment, so the output at that
token predicts ``r_k[0]`` for every ``k``. Attention: a prefix token sees its group's
prefix causally; a token of segment ``k`` sees its group's whole prefix and segment ``k``
causally; nothing crosses groups or segments. Pad tokens attend only to themselves,
carry no loss and are kept out of MoE routing.

The two baselines use the same row format, so one model path runs all three layouts:

* ``unpacked``: one (prompt, response) per row, i.e. one group placement with one segment;
* ``duplicated``: several placements per row, each with the prompt written again and a
  single segment. Placements of the same source group share ``group_id``.

Per-token views (``doc_ids``, ``segment_ids``, ``response_slots``) are derived from the
placements by :func:`token_views`; attention backends and losses consume only those
views plus the placements, never re-deriving the layout themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PAD_DOC = -1
"""``doc_ids`` / ``segment_ids`` value of a pad token."""

PREFIX_SEGMENT = 0
"""``segment_ids`` value of a shared-prefix token; segment ``j`` of a placement is ``j + 1``."""

NO_RESPONSE = -1
"""``response_slots`` value of a token that carries no response loss."""


@dataclass(frozen=True)
class Segment:
    """One response's segment inside a row.

    ``start`` is the row index of the repeated last prompt token; the segment covers
    ``[start, start + length)`` with ``length = 1 + R`` (R = response tokens, EOS included).
    Loss is carried by the first ``R`` tokens (each predicts the next response token).
    """

    response_index: int
    start: int
    length: int

    @property
    def num_response_tokens(self) -> int:
        return self.length - 1

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class GroupPlacement:
    """One group (or, in the duplicated baseline, one copy of it) inside a row.

    ``prefix_start``/``prefix_length`` span the shared prefix ``p[0..P-2]``
    (``prefix_length == P - 1``, possibly 0); segments follow the prefix contiguously in
    the order listed.
    """

    group_id: int
    prefix_start: int
    prefix_length: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        return self.segments[-1].end if self.segments else self.prefix_start + self.prefix_length


@dataclass
class PackedRow:
    """A fixed-length row of ``L`` tokens.

    All arrays have shape ``(L,)`` and dtype int64 except ``loss_mask`` (bool).
    ``labels[i]`` is the next-token target of position ``i`` (``pad_id`` where there is none);
    ``loss_mask[i]`` is True exactly on response-predicting positions.
    """

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    groups: tuple[GroupPlacement, ...]

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_real_tokens(self) -> int:
        return max((g.end for g in self.groups), default=0)


def build_row(
    placements: list[tuple[int, np.ndarray, list[tuple[int, np.ndarray]]]],
    row_length: int,
    pad_id: int,
) -> PackedRow:
    """Lay out groups one after another in a row of ``row_length`` tokens.

    ``placements``: ``(group_id, prompt_tokens, [(response_index, response_tokens), ...])``
    in row order. Prompts must have at least one token, responses at least one.
    Raises ``ValueError`` if the content does not fit.
    """
    tokens = np.full(row_length, pad_id, dtype=np.int64)
    labels = np.full(row_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(row_length, dtype=bool)
    position_ids = np.zeros(row_length, dtype=np.int64)
    groups: list[GroupPlacement] = []
    cursor = 0
    for group_id, prompt, responses in placements:
        if len(prompt) < 1 or not responses or any(len(r) < 1 for _, r in responses):
            raise ValueError(f"group {group_id}: empty prompt or response")
        prefix_len = len(prompt) - 1
        need = prefix_len + sum(1 + len(r) for _, r in responses)
        if cursor + need > row_length:
            raise ValueError(f"group {group_id} needs {need} tokens, {row_length - cursor} left in row")
        prefix_start = cursor
        tokens[cursor : cursor + prefix_len] = prompt[:-1]
        labels[cursor : cursor + prefix_len] = prompt[1:]
        position_ids[cursor : cursor + prefix_len] = np.arange(prefix_len)
        cursor += prefix_len
        segments = []
        for response_index, response in responses:
            seg_len = 1 + len(response)
            tokens[cursor] = prompt[-1]
            tokens[cursor + 1 : cursor + seg_len] = response
            labels[cursor : cursor + seg_len - 1] = response
            loss_mask[cursor : cursor + seg_len - 1] = True
            position_ids[cursor : cursor + seg_len] = np.arange(prefix_len, prefix_len + seg_len)
            segments.append(Segment(response_index, cursor, seg_len))
            cursor += seg_len
        groups.append(GroupPlacement(group_id, prefix_start, prefix_len, tuple(segments)))
    return PackedRow(tokens, labels, loss_mask, position_ids, tuple(groups))


@dataclass
class TokenViews:
    """Per-token views of a row's layout, all ``(L,)`` int64.

    * ``doc_ids``: index of the placement within the row, ``PAD_DOC`` on pad tokens;
    * ``segment_ids``: ``PREFIX_SEGMENT`` on prefix tokens, ``j + 1`` on the j-th segment of
      its placement, ``PAD_DOC`` on pad;
    * ``response_slots``: for loss-carrying tokens, the index into ``responses`` of the
      response they belong to; ``NO_RESPONSE`` elsewhere.

    ``responses`` lists ``(group_id, response_index)`` in row order, one per segment.
    Two tokens ``i`` (query) and ``j`` (key) may attend iff
    ``j <= i and doc[i] == doc[j] != PAD_DOC and seg[j] in (PREFIX_SEGMENT, seg[i])``;
    a pad token attends only to itself.
    """

    doc_ids: np.ndarray
    segment_ids: np.ndarray
    response_slots: np.ndarray
    responses: list[tuple[int, int]]


def token_views(row: PackedRow) -> TokenViews:
    """Derive the per-token views of ``row`` from its placements."""
    length = row.length
    doc_ids = np.full(length, PAD_DOC, dtype=np.int64)
    segment_ids = np.full(length, PAD_DOC, dtype=np.int64)
    response_slots = np.full(length, NO_RESPONSE, dtype=np.int64)
    responses: list[tuple[int, int]] = []
    for doc, group in enumerate(row.groups):
        doc_ids[group.prefix_start : group.prefix_start + group.prefix_length] = doc
        segment_ids[group.prefix_start : group.prefix_start + group.prefix_length] = PREFIX_SEGMENT
        for j, seg in enumerate(group.segments):
            doc_ids[seg.start : seg.end] = doc
            segment_ids[seg.start : seg.end] = j + 1
            response_slots[seg.start : seg.end - 1] = len(responses)
            responses.append((group.group_id, seg.response_index))
    return TokenViews(doc_ids, segment_ids, response_slots, responses)


def may_attend(q_pos: Any, kv_pos: Any, q_doc: Any, kv_doc: Any, q_seg: Any, kv_seg: Any) -> Any:
    """The attention rule of :class:`TokenViews`, elementwise and array-agnostic.

    Arguments are broadcastable numpy arrays, torch tensors or scalars (row positions and
    ``doc_ids``/``segment_ids`` of the query and the key); returns a boolean array: True where
    the query may attend to the key. Every mask in the project (numpy, torch dense,
    FlexAttention ``mask_mod``) evaluates this one function.
    """
    same_doc = (q_doc == kv_doc) & (q_doc != PAD_DOC)
    visible_seg = (kv_seg == PREFIX_SEGMENT) | (kv_seg == q_seg)
    return ((kv_pos <= q_pos) & same_doc & visible_seg) | (kv_pos == q_pos)


def dense_mask(doc_ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """The ``(L, L)`` boolean attention mask (True = may attend) implied by the views."""
    idx = np.arange(doc_ids.shape[0])
    return may_attend(
        idx[:, None],
        idx[None, :],
        doc_ids[:, None],
        doc_ids[None, :],
        segment_ids[:, None],
        segment_ids[None, :],
    )
