"""``PrefixSharedAttention``: the module for the ``core_attention`` slot of Megatron-Core's
``SelfAttention`` / ``MLASelfAttention`` submodules.

Use in a layer spec::

    ModuleSpec(module=PrefixSharedAttention, params={"backend": "auto"})

It takes what Megatron's ``DotProductAttention`` takes (0.16.1 and 0.19.2 signatures, plus
``k_channels``/``v_channels`` as MLA passes them) and returns the same ``[Sq, B, Hq * Dv]``.
"""

from __future__ import annotations

import math

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_prefpack.attention.backends import get_backend
from megatron_prefpack.attention.context_parallel import gather_sequence
from megatron_prefpack.attention.params import PrefPackSeqParams


class PrefixSharedAttention(MegatronModule):
    """Prefix-shared core attention over sbhd tensors, with its own context parallelism.

    ``forward(query [Sq, B, Hq, Dqk], key [Sk, B, Hkv, Dqk], value [Sk, B, Hkv, Dv], ...)``
    returns ``[Sq, B, Hq * Dv]``. With ``packed_seq_params`` a :class:`PrefPackSeqParams`, the
    layout rule applies; with ``None`` every row is one causal document (causal aligned
    bottom-right when ``Sk > Sq``, i.e. decoding against a KV cache), and ``attention_mask``
    and ``attn_mask_type`` are not consulted, as in Transformer Engine's causal path.

    ``softmax_scale`` defaults to ``1 / sqrt(k_channels or config.kv_channels)``; a given value
    (MLA's yarn-corrected one) is used as is. ``apply_query_key_layer_scaling`` does not change
    the result in Megatron (the scale is divided then multiplied back), so it is ignored.
    Attention dropout must be 0; softmax types other than ``vanilla`` and sliding windows are
    refused. ``cp_comm_type`` is accepted for signature compatibility: context parallelism
    here is always the K/V all-gather of :mod:`megatron_prefpack.attention.context_parallel`.
    ``v_channels`` is accepted for the same reason (``Dv`` is read from ``value``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout != 0:
            raise ValueError(f"PrefixSharedAttention supports attention_dropout=0 only, got {dropout}")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(
                f"PrefixSharedAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}"
            )
        if getattr(config, "window_size", None) is not None:
            raise ValueError(
                "PrefixSharedAttention does not support sliding-window attention (config.window_size)"
            )
        if attention_type != "self":
            raise ValueError(
                f"PrefixSharedAttention is self-attention only, got attention_type={attention_type!r}"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_group = getattr(pg_collection, "cp", None)
        self.softmax_scale = (
            1.0 / math.sqrt(k_channels or config.kv_channels) if softmax_scale is None else softmax_scale
        )
        if backend != "auto":
            get_backend(backend)  # unknown or not runnable here: fail at model construction
        self.backend_name = backend
        self._causal_params: PrefPackSeqParams | None = None

    def _cp_size_rank(self) -> tuple[int, int]:
        if self.cp_group is None:
            return 1, 0
        return self.cp_group.size(), self.cp_group.rank()

    def _fallback_params(self, batch: int, seq_len: int, device: torch.device) -> PrefPackSeqParams:
        """One causal document per row, cached while batch, length and device stay the same."""
        cached = self._causal_params
        if cached is None or cached.doc_ids.shape != (batch, seq_len) or cached.doc_ids.device != device:
            cached = self._causal_params = PrefPackSeqParams.causal(batch, seq_len, device)
        return cached

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Attention output ``[Sq, B, Hq * Dv]`` (see the class docstring)."""
        if attention_bias is not None:
            raise ValueError("PrefixSharedAttention does not support attention_bias")
        cp_size, cp_rank = self._cp_size_rank()
        seq_k, batch = key.shape[0] * cp_size, key.shape[1]
        if packed_seq_params is None:
            params = self._fallback_params(batch, seq_k, key.device)
        elif isinstance(packed_seq_params, PrefPackSeqParams):
            params = packed_seq_params
            if (params.batch_size, params.seq_len) != (batch, seq_k) or query.shape[0] != key.shape[0]:
                raise ValueError(
                    f"PrefPackSeqParams rows are (B, S) = {(params.batch_size, params.seq_len)}, but attention got "
                    f"query {tuple(query.shape)} and key {tuple(key.shape)} with context_parallel_size {cp_size}"
                )
        else:
            raise TypeError(
                f"PrefixSharedAttention needs PrefPackSeqParams (or None), got {type(packed_seq_params).__name__} "
                f"with qkv_format={packed_seq_params.qkv_format!r}"
            )
        if cp_size > 1:
            key = gather_sequence(key, self.cp_group)
            value = gather_sequence(value, self.cp_group)
        backend = get_backend(self.backend_name, query.device)
        plan = params.plan(backend, cp_size, cp_rank, num_queries=query.shape[0] if cp_size == 1 else None)
        out = backend.attend(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), plan, self.softmax_scale
        )
        return out.transpose(0, 1).reshape(query.shape[0], batch, -1)
