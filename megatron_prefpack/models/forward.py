"""One model forward over a batch of prefix-shared rows.

The same call runs all three row layouts (preference-packed, duplicated-prompt, unpacked): they
differ only in how ``layout.build_row`` placed the groups, which the batch's per-token views
(``doc_ids``, ``segment_ids``, ``position_ids``) describe.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from megatron_prefpack.data.batch import RowBatch
from megatron_prefpack.data.layout import PAD_DOC

PER_TOKEN_FIELDS = (
    "tokens",
    "labels",
    "loss_mask",
    "position_ids",
    "doc_ids",
    "segment_ids",
    "response_slots",
)
"""The ``RowBatch`` fields with one value per row position ``(B, S)``."""


class RowViews(Protocol):
    """What :func:`model_forward` reads from a batch (``data.batch.RowBatch`` has it all):
    full rows, ``(B, S)`` int64 tensors on the model's device."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    segment_ids: torch.Tensor


def model_forward(model: torch.nn.Module, batch: RowViews, *, backend: str = "auto") -> torch.Tensor:
    """Run ``model`` (a ``GPTModel`` from ``build_model``, possibly wrapped in DDP/Float16Module).

    Builds the attention metadata (``PrefPackSeqParams``, with ``backend``'s plan for this rank)
    once for the micro-batch; every layer reuses it. Pad tokens (``doc_ids == PAD_DOC``) go in as
    Megatron's ``padding_mask``, so MoE routing statistics (aux loss, z-loss, expert-bias counts)
    ignore them. Under context parallelism the rank feeds its load-balanced share of every row
    (``attention.shard_for_cp`` order) and gets logits for those tokens only; the loss reads
    the batch through :func:`cp_local` to match.

    Returns on the last pipeline stage the vocab-parallel logits ``(B, S / CP, V / TP)`` in the
    model's dtype; on other stages the hidden states ``(S / (CP * TP), B, H)`` Megatron sends to
    the next stage. Non-first stages ignore ``batch.tokens`` (their input arrives through
    ``set_input_tensor``) but still need the views.
    """
    from megatron.core import parallel_state

    from megatron_prefpack.attention import PrefPackSeqParams, shard_for_cp

    cp_size = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    params = PrefPackSeqParams.from_views(
        batch.doc_ids,
        batch.segment_ids,
        batch.position_ids,
        backend=backend,
        cp_size=cp_size,
        cp_rank=cp_rank,
    )
    tokens, pads = batch.tokens, batch.doc_ids == PAD_DOC
    if cp_size > 1:
        tokens, pads = (shard_for_cp(t, 1, cp_size, cp_rank) for t in (tokens, pads))
    return model(
        input_ids=tokens,
        position_ids=params.local_position_ids(cp_size, cp_rank),
        attention_mask=None,
        packed_seq_params=params,
        padding_mask=pads,
    )


def cp_local(batch: RowBatch) -> RowBatch:
    """This context-parallel rank's view of ``batch``, matching :func:`model_forward`'s output.

    The per-token fields (:data:`PER_TOKEN_FIELDS`) keep the rank's load-balanced share of each
    row, ``(B, S / CP)`` in the logits' order; per-response and per-group fields are unchanged
    (losses all-reduce their per-response sums over the CP group). ``batch`` itself without CP."""
    from megatron.core import parallel_state

    from megatron_prefpack.attention import shard_for_cp

    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return batch
    cp_rank = parallel_state.get_context_parallel_rank()
    return dataclasses.replace(
        batch, **{f: shard_for_cp(getattr(batch, f), 1, cp_size, cp_rank) for f in PER_TOKEN_FIELDS}
    )
