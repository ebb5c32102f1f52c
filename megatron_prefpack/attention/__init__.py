"""Prefix-shared core attention for the layout of ``megatron_prefpack.data.layout``.

Public API:

* :class:`PrefPackSeqParams` (``params``): the rows' views and cached plans, passed to the model
  as ``packed_seq_params``;
* :class:`PrefixSharedAttention` (``core_attention``): the ``core_attention`` slot module;
* :func:`get_backend` / :data:`BACKEND_NAMES` (``backends``): ``attend(q, k, v, plan, scale)``
  backends (reference, varlen, flex);
* :func:`dense_mask` (``masks``): the torch ``(B, Sq, S)`` mask;
* :func:`cp_positions`, :func:`shard_for_cp`, :func:`gather_sequence` (``context_parallel``).
"""

from megatron_prefpack.attention.backends import (
    BACKEND_NAMES,
    AttentionBackend,
    BackendUnavailableError,
    get_backend,
    resolve_backend_name,
)
from megatron_prefpack.attention.context_parallel import cp_positions, gather_sequence, shard_for_cp
from megatron_prefpack.attention.core_attention import PrefixSharedAttention
from megatron_prefpack.attention.masks import dense_mask
from megatron_prefpack.attention.params import PrefPackSeqParams

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "BackendUnavailableError",
    "PrefPackSeqParams",
    "PrefixSharedAttention",
    "cp_positions",
    "dense_mask",
    "gather_sequence",
    "get_backend",
    "resolve_backend_name",
    "shard_for_cp",
]
