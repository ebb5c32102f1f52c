"""The gather plan that turns prefix-shared rows into one variable-length attention call.

Every non-pad query belongs to a *unit*: the shared prefix of its group, or one segment.
Queries are cut into *runs*: maximal stretches of consecutive row positions of one unit
(without context parallelism a run is a whole unit; with it, a unit may be split across the
rank's chunks). Each run becomes one sequence of the varlen call:

* a prefix run: q = the run, kv = the prefix from its start up to the run's last token;
* a segment run: q = the run, kv = the group's whole prefix followed by the segment from its
  start up to the run's last token.

With causal masking aligned bottom-right (query ``i`` of ``Lq`` sees key ``j`` of ``Lk`` iff
``j <= i + Lk - Lq``), each sequence computes exactly the attention the layout rule allows,
and only that. Pad queries attend only to themselves, so their output is their own value
vector; the plan carries them separately and no kernel sees them.

Plans are built once per micro-batch with vectorised torch ops on the views' device (a few
host syncs for sizes) and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_prefpack.attention.masks import query_positions
from megatron_prefpack.data.layout import PAD_DOC, PREFIX_SEGMENT


@dataclass(frozen=True)
class TokenSpans:
    """Per-token positions, all ``(B, S)`` int64, derived from ``doc_ids``/``segment_ids``.

    ``unit_start``: row position where the token's unit (prefix or segment) begins;
    ``doc_start``: where its placement begins (= its prefix's start);
    ``prefix_length``: for a segment token, the length of its group's prefix (for a prefix
    token, the number of prefix tokens up to and including it).
    """

    unit_start: torch.Tensor
    doc_start: torch.Tensor
    prefix_length: torch.Tensor


def token_spans(doc_ids: torch.Tensor, segment_ids: torch.Tensor) -> TokenSpans:
    """Compute :class:`TokenSpans` for rows laid out by ``layout.build_row``.

    Relies on the layout contract: each placement is contiguous, its prefix comes first and
    each segment is contiguous.
    """
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    doc_changes = torch.ones_like(doc_ids, dtype=torch.bool)
    doc_changes[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    unit_changes = doc_changes.clone()
    unit_changes[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    zero = torch.zeros_like(positions)
    doc_start = torch.cummax(torch.where(doc_changes, positions, zero), dim=1).values
    unit_start = torch.cummax(torch.where(unit_changes, positions, zero), dim=1).values
    is_prefix = ((segment_ids == PREFIX_SEGMENT) & (doc_ids != PAD_DOC)).long()
    prefix_count = torch.cumsum(is_prefix, dim=1)
    prefix_before_doc = torch.gather(prefix_count - is_prefix, 1, doc_start)
    return TokenSpans(unit_start, doc_start, prefix_count - prefix_before_doc)


def concat_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    total = int(lengths.sum())
    owner = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total
    )
    offsets = torch.cumsum(lengths, 0) - lengths
    return starts[owner] + torch.arange(total, device=lengths.device) - offsets[owner]


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


@dataclass(frozen=True)
class VarlenPlan:
    """One varlen attention call for ``B`` rows: ``Sq`` queries per row against ``S`` keys.

    Indices address flattened tensors: queries ``(B * Sq, ...)``, keys/values ``(B * S, ...)``.

    * ``q_gather`` ``(Tq,)``: flat query index of each packed query (runs in order);
      ``None`` when every query is real (packed order = flat order);
    * ``kv_gather`` ``(Tk,)``: flat key index of each packed key/value;
    * ``cu_seqlens_q``/``cu_seqlens_k`` ``(R + 1,)`` int32 and ``max_seqlen_q``/``max_seqlen_k``:
      the R sequences, causal aligned bottom-right;
    * ``pad_kv`` ``(Np,)``: flat key index of each pad query's own token (its output is that
      value vector);
    * ``output_index`` ``(B * Sq,)``: for each flat query, its row in
      ``cat([packed_output, pad_output])``; ``None`` when that is the identity.
    """

    batch: int
    num_queries: int
    num_keys: int
    q_gather: torch.Tensor | None
    kv_gather: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    pad_kv: torch.Tensor
    output_index: torch.Tensor | None

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens_q.numel()) - 1


def build_varlen_plan(
    doc_ids: torch.Tensor, segment_ids: torch.Tensor, q_index: torch.Tensor | None = None
) -> VarlenPlan:
    """Build the :class:`VarlenPlan` of rows with views ``(B, S)``.

    ``q_index`` (``(Sq,)``, default all positions) lists the row positions of the queries in
    the order the query tensor holds them (context parallelism: the rank's chunks).
    """
    batch, seq = doc_ids.shape
    device = doc_ids.device
    q_pos = query_positions(seq, q_index, device)
    num_q = int(q_pos.numel())
    spans = token_spans(doc_ids, segment_ids)

    q_unit = spans.unit_start[:, q_pos]
    real = doc_ids[:, q_pos] != PAD_DOC
    continues = torch.zeros_like(real)
    continues[:, 1:] = (
        real[:, 1:]
        & real[:, :-1]
        & (q_pos[1:] == q_pos[:-1] + 1)[None, :]
        & (q_unit[:, 1:] == q_unit[:, :-1])
    )
    real_flat = real.reshape(-1)
    q_gather = torch.nonzero(real_flat).squeeze(1)
    pad_flat = torch.nonzero(~real_flat).squeeze(1)
    num_real, num_pad = int(q_gather.numel()), int(pad_flat.numel())

    run_first = torch.nonzero(~continues.reshape(-1)[q_gather]).squeeze(1)
    run_end = torch.cat([run_first[1:], run_first.new_tensor([num_real])])
    q_lengths = run_end - run_first
    last_flat = q_gather[run_end - 1]
    row, last_pos = last_flat // num_q, q_pos[last_flat % num_q]
    unit_start = spans.unit_start[row, last_pos]
    is_segment = segment_ids[row, last_pos] != PREFIX_SEGMENT
    prefix_length = torch.where(is_segment, spans.prefix_length[row, last_pos], 0)
    own_length = last_pos - unit_start + 1
    kv_gather = concat_ranges(
        torch.stack([row * seq + spans.doc_start[row, last_pos], row * seq + unit_start], 1).reshape(-1),
        torch.stack([prefix_length, own_length], 1).reshape(-1),
    )
    kv_lengths = prefix_length + own_length

    output_index = None
    if num_pad:
        output_index = torch.empty(batch * num_q, dtype=torch.long, device=device)
        output_index[q_gather] = torch.arange(num_real, device=device)
        output_index[pad_flat] = torch.arange(num_real, num_real + num_pad, device=device)
    return VarlenPlan(
        batch=batch,
        num_queries=num_q,
        num_keys=seq,
        q_gather=q_gather if num_pad else None,
        kv_gather=kv_gather,
        cu_seqlens_q=_cumulative(q_lengths),
        cu_seqlens_k=_cumulative(kv_lengths),
        max_seqlen_q=int(q_lengths.max()) if q_lengths.numel() else 0,
        max_seqlen_k=int(kv_lengths.max()) if kv_lengths.numel() else 0,
        pad_kv=(pad_flat // num_q) * seq + q_pos[pad_flat % num_q],
        output_index=output_index,
    )
