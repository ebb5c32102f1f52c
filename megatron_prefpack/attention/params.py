"""``PrefPackSeqParams``: the row layout travelling with a micro-batch to every attention layer.

Megatron-Core hands ``packed_seq_params`` unchanged from ``GPTModel.forward`` down to each
layer's ``core_attention``. This subclass carries the per-token views of the rows and caches
each backend's plan, so a plan is built once per micro-batch and reused by every layer (and by
activation recomputation). ``qkv_format`` is ``"sbhd"``: every Megatron-Core code path keyed
on ``qkv_format == "thd"`` (squeezing the batch dim, RoPE with ``cu_seqlens``, TE THD) stays
off and tensors keep their ``[s, b, ...]`` shape. ``max_seqlen_q``/``max_seqlen_kv`` are the
full row length, so ``RotaryEmbedding.get_rotary_seq_len`` returns what it would without
packed params.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_prefpack.attention.backends import AttentionBackend, get_backend
from megatron_prefpack.attention.context_parallel import cp_positions
from megatron_prefpack.data.layout import PREFIX_SEGMENT


class RowViews(Protocol):
    """Anything with the three ``(B, S)`` int64 views, e.g. ``data.batch.RowBatch``."""

    doc_ids: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor


@dataclass(eq=False)
class PrefPackSeqParams(PackedSeqParams):
    """Packed-row layout for prefix-shared attention.

    ``doc_ids``, ``segment_ids``, ``position_ids``: ``(B, S)`` int64 views of the **full**
    rows (semantics: ``layout.TokenViews``; positions as ``layout.build_row``), on the model's
    device; under context parallelism too, although each rank holds only its ``S / CP`` tokens.
    ``plans`` caches plans by ``(backend name, cp_size, cp_rank, num_queries)``.
    """

    qkv_format: str = "sbhd"
    doc_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    plans: dict[tuple[str, int, int, int | None], Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        parent_post_init = getattr(super(), "__post_init__", None)  # megatron-core >= 0.17 has one
        if parent_post_init is not None:
            parent_post_init()
        if self.qkv_format != "sbhd":
            raise ValueError(f"PrefPackSeqParams needs qkv_format='sbhd', got {self.qkv_format!r}")
        views = {"doc_ids": self.doc_ids, "segment_ids": self.segment_ids, "position_ids": self.position_ids}
        for name, view in views.items():
            if not isinstance(view, torch.Tensor) or view.dim() != 2 or view.dtype != torch.long:
                described = (
                    f"{view.dtype} tensor of shape {tuple(view.shape)}"
                    if isinstance(view, torch.Tensor)
                    else view
                )
                raise ValueError(f"PrefPackSeqParams.{name} must be a (B, S) int64 tensor, got {described}")
            if view.shape != self.doc_ids.shape:
                raise ValueError(
                    f"PrefPackSeqParams.{name} has shape {tuple(view.shape)}, doc_ids {tuple(self.doc_ids.shape)}"
                )
        if self.max_seqlen_q is None:
            self.max_seqlen_q = self.seq_len
        if self.max_seqlen_kv is None:
            self.max_seqlen_kv = self.seq_len

    @property
    def batch_size(self) -> int:
        return int(self.doc_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Full row length ``S`` (before context-parallel sharding)."""
        return int(self.doc_ids.shape[1])

    @classmethod
    def from_views(
        cls,
        doc_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        position_ids: torch.Tensor,
        backend: str | None = None,
        cp_size: int = 1,
        cp_rank: int = 0,
    ) -> PrefPackSeqParams:
        """Params for rows with these views; with ``backend``, its plan is built now (for this CP rank)."""
        params = cls(doc_ids=doc_ids, segment_ids=segment_ids, position_ids=position_ids)
        if backend is not None:
            params.plan(get_backend(backend, doc_ids.device), cp_size, cp_rank)
        return params

    @classmethod
    def from_batch(
        cls, batch: RowViews, backend: str | None = None, cp_size: int = 1, cp_rank: int = 0
    ) -> PrefPackSeqParams:
        """:meth:`from_views` on ``batch.doc_ids``, ``batch.segment_ids``, ``batch.position_ids``."""
        return cls.from_views(batch.doc_ids, batch.segment_ids, batch.position_ids, backend, cp_size, cp_rank)

    @classmethod
    def causal(
        cls, batch_size: int, seq_len: int, device: torch.device | str | None = None
    ) -> PrefPackSeqParams:
        """Rows that are each one plain causal document (a prefix of ``seq_len`` tokens)."""
        zeros = torch.full((batch_size, seq_len), PREFIX_SEGMENT, dtype=torch.long, device=device)
        positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        return cls(doc_ids=zeros, segment_ids=zeros, position_ids=positions)

    def query_index(
        self, cp_size: int = 1, cp_rank: int = 0, num_queries: int | None = None
    ) -> torch.Tensor | None:
        """Row positions of the queries a rank holds (``None``: all ``S``, in order).

        With ``cp_size > 1``: the rank's load-balanced chunks. Otherwise ``num_queries < S``
        selects the last ``num_queries`` positions (decoding against a KV cache).
        """
        device = self.doc_ids.device
        if cp_size > 1:
            return cp_positions(self.seq_len, cp_size, cp_rank, device)
        if num_queries is None or num_queries == self.seq_len:
            return None
        if not 0 < num_queries < self.seq_len:
            raise ValueError(f"num_queries {num_queries} out of range for rows of {self.seq_len} tokens")
        return torch.arange(self.seq_len - num_queries, self.seq_len, device=device)

    def plan(
        self, backend: AttentionBackend, cp_size: int = 1, cp_rank: int = 0, num_queries: int | None = None
    ) -> Any:
        """``backend``'s plan for these rows and this rank's queries, built on first use, then cached."""
        key = (
            backend.name,
            cp_size,
            cp_rank,
            None if cp_size > 1 or num_queries == self.seq_len else num_queries,
        )
        if key not in self.plans:
            with torch.no_grad():
                self.plans[key] = backend.build_plan(
                    self.doc_ids, self.segment_ids, self.query_index(cp_size, cp_rank, num_queries)
                )
        return self.plans[key]

    def local_position_ids(self, cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
        """``(B, S / CP)`` position ids of the tokens ``cp_rank`` holds, in local order (for RoPE)."""
        if cp_size == 1:
            return self.position_ids
        return self.position_ids[:, cp_positions(self.seq_len, cp_size, cp_rank, self.position_ids.device)]
