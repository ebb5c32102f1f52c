"""RoPE that follows the batch's position ids instead of 0..S-1.

Megatron-Core computes rotary frequencies for positions ``0..S-1`` of the row: in
``GPTModel._preprocess`` for standard attention and inside
``MultiLatentAttention.get_query_key_value_tensors`` for MLA, ignoring ``position_ids``. In a
preference-packed row the responses restart at the prompt's end, so every segment after the first
would be rotated with the wrong angles.

:class:`PositionFollowingRotary` wraps Megatron's ``RotaryEmbedding`` / ``YarnRotaryEmbedding``
(same call signature, so Megatron's code calls it unchanged) and returns the frequencies of the
positions set with :meth:`PositionFollowingRotary.following`, shaped ``(S, B, 1, d)``.
``_apply_rotary_pos_emb_bshd`` broadcasts that against ``(S, B, heads, d)`` (and MLA's
``(S, B, 1, d)`` key rope part). The per-position values are rows of Megatron's own table, so a
token at position ``p`` gets bit-identical angles to the unpacked sequence's token at ``p``.
Fused RoPE kernels take positions 0..S-1 only; the config disables them
(``apply_rope_fusion=False``, see :func:`megatron_prefpack.models.config.to_transformer_config`).

Two plugs use it, neither forks Megatron code:

* :class:`PositionFollowingGPTModel` (standard attention): wraps ``self.rotary_pos_emb`` and
  scopes ``_preprocess`` with the ``position_ids`` given to ``GPTModel.forward``;
* :class:`PositionFollowingMLASelfAttention` (the MLA ``self_attention`` spec slot): wraps its own
  rotary and scopes ``get_query_key_value_tensors`` with the positions carried by
  ``PrefPackSeqParams`` (TransformerLayer does not pass ``position_ids`` to attention). It hands Megatron
  ``packed_seq_params=None`` for the q/k/v projection, because MLA squeezes dim 1 whenever
  packed params are present (a THD-only reshape that breaks ``sbhd`` rows with B=1); the params
  still reach core attention. Under tensor + sequence parallelism it also hands Megatron the KV
  down-projection at full width (:class:`FullWidthKVDownProjection`): Megatron's own TP-split
  path loses part of the RoPE key's weight gradient.

Context parallelism: positions are those of the tokens this rank holds; the table is never
sliced by CP rank (Megatron's CP slicing assumes 0..S-1 load-balanced chunks).

Llama-3.1+ frequency scaling (:func:`apply_llama3_scaling`) rescales the wrapped module's inverse
frequencies once, at build time, with Megatron's own Llama-3 rule given all four parameters
(``GPTModel`` only passes ``factor`` and keeps the other three at Llama 3.1's values).
Partial rotary (``rotary_percent < 1``) is Megatron's: the first ``rotary_percent * head_dim``
channels of each head are rotated (rotate-half pairing), the rest pass through, which is what
transformers' GLM-4.5 (``Glm4Moe``) does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from torch import Tensor

from megatron_prefpack.models.config import Llama3RopeConfig


class PositionFollowingRotary(torch.nn.Module):
    """Frequencies of explicit per-token positions from a Megatron rotary module.

    ``inner``: a ``RotaryEmbedding`` or ``YarnRotaryEmbedding``; ``table_length``: positions
    ``0..table_length-1`` are supported (the model's maximum sequence length). Calls made outside
    :meth:`following` raise ``RuntimeError``: a silent fallback to 0..S-1 is exactly the bug this
    module exists to prevent.
    """

    def __init__(self, inner: RotaryEmbedding, table_length: int) -> None:
        super().__init__()
        self.inner = inner
        self.table_length = table_length
        self._positions: Tensor | None = None

    @contextlib.contextmanager
    def following(self, position_ids: Tensor) -> Iterator[None]:
        """Within the block, calls return frequencies for ``position_ids`` ``(B, S)`` int."""
        if position_ids is None or position_ids.dim() != 2:
            raise ValueError("RoPE needs position_ids of shape (B, S); got " + _describe(position_ids))
        previous, self._positions = self._positions, position_ids
        try:
            yield
        finally:
            self._positions = previous

    def frequencies(self, position_ids: Tensor) -> Tensor | tuple[Tensor, float]:
        """``(S, B, 1, d)`` float32 angles (plus YaRN's mscale when ``inner`` is YaRN)."""
        # packed_seq=True only stops Megatron from slicing the table by CP rank.
        out = self.inner(self.table_length, packed_seq=True)
        table, mscale = out if isinstance(out, tuple) else (out, None)
        freqs = table[:, 0, 0, :][position_ids.t()].unsqueeze(2)
        return freqs if mscale is None else (freqs, mscale)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, float]:
        """Megatron calls ``rotary(seq_len, packed_seq=..., cp_group=...)``; the arguments are
        superseded by the positions set with :meth:`following`."""
        return self.frequencies(self._current())

    def get_rotary_seq_len(self, *args: Any, **kwargs: Any) -> int:
        """The row length of the current positions (what Megatron asks before calling)."""
        return int(self._current().shape[1])

    def _current(self) -> Tensor:
        if self._positions is None:
            raise RuntimeError(
                "PositionFollowingRotary was called without position ids; the model must be run "
                "with position_ids (and, for MLA, PrefPackSeqParams carrying position_ids)"
            )
        return self._positions


def _describe(t: Tensor | None) -> str:
    return "None" if t is None else f"shape {tuple(t.shape)}"


def apply_llama3_scaling(rotary: RotaryEmbedding, llama3: Llama3RopeConfig) -> None:
    """Rescale ``rotary.inv_freq`` in place as transformers' ``rope_type: llama3`` does.

    Must run before the module's first call (Megatron caches the tables it computes)."""
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq,
        factor=llama3.factor,
        low_freq_factor=llama3.low_freq_factor,
        high_freq_factor=llama3.high_freq_factor,
        original_max_position_embeddings=llama3.original_max_position_embeddings,
    )


class PositionFollowingGPTModel(GPTModel):
    """``GPTModel`` whose RoPE follows ``position_ids`` (standard attention; MLA does its own).

    Extra constructor argument ``llama3_rope``: Llama-3.1+ frequency scaling of the RoPE
    (:func:`apply_llama3_scaling`); needs ``position_embedding_type="rope"``.

    Also scatters ``padding_mask`` to sequence-parallel shards on pipeline stages other than the
    first: Megatron does this only where the embedding runs, so MoE layers on later stages would
    otherwise get a ``(B, S)`` mask for ``S / TP`` tokens.
    """

    def __init__(self, *args: Any, llama3_rope: Llama3RopeConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        rotary = getattr(self, "rotary_pos_emb", None)
        if llama3_rope is not None:
            if not isinstance(rotary, RotaryEmbedding):
                raise ValueError(
                    "llama3_rope needs RoPE (position_embedding_type='rope', standard attention)"
                )
            apply_llama3_scaling(rotary, llama3_rope)
        if isinstance(rotary, RotaryEmbedding):
            self.rotary_pos_emb = PositionFollowingRotary(rotary, self.max_sequence_length)

    def _preprocess(self, input_ids: Tensor, position_ids: Tensor, *args: Any, **kwargs: Any):
        padding_mask = kwargs.get("padding_mask")
        if padding_mask is not None and self.config.sequence_parallel and not self.pre_process:
            kwargs["padding_mask"] = (
                scatter_to_sequence_parallel_region(padding_mask.transpose(0, 1).contiguous())
                .transpose(0, 1)
                .contiguous()
            )
        if not isinstance(getattr(self, "rotary_pos_emb", None), PositionFollowingRotary):
            return super()._preprocess(input_ids, position_ids, *args, **kwargs)
        with self.rotary_pos_emb.following(position_ids):
            return super()._preprocess(input_ids, position_ids, *args, **kwargs)


class FullWidthKVDownProjection(torch.nn.Module):
    """MLA's KV down-projection, split over TP (Megatron's local spec), made to return what a
    duplicated projection (the Transformer Engine spec) returns under sequence parallelism: all
    of ``kv_lora_rank + qk_pos_emb_head_dim`` for this rank's tokens.

    Why: Megatron-Core (0.16 and 0.19) all-gathers the split output itself, but the RoPE key
    ``k_pos_emb`` is shared by every head, so on each TP rank its gradient holds only this rank's
    heads' share, and the gather's backward keeps this rank's slice of it: the other ranks'
    shares of the RoPE rows' weight gradient are lost (about 70% off on the tiny MLA model).
    Given the full width, Megatron takes its duplicated-projection path, whose sequence-parallel
    gather of ``k_pos_emb`` sums the shares in backward. Forward values are unchanged. Holds no
    parameters; the wrapped module keeps its name. Without sequence parallelism the RoPE rows
    are still wrong (``tests/test_parallel_gradients.py``), so training refuses MLA with tensor
    parallelism but no sequence parallelism."""

    def __init__(self, projection: torch.nn.Module) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor | None]:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        out, bias = self.projection(hidden_states)  # [s, b, (kv_lora_rank + rope) / TP]
        full = gather_from_tensor_model_parallel_region(out)  # [s, b, kv_lora_rank + rope]
        return scatter_to_sequence_parallel_region(full), bias  # [s / TP, b, ...]


class PositionFollowingMLASelfAttention(MLASelfAttention):
    """``MLASelfAttention`` whose RoPE follows the positions of ``PrefPackSeqParams``.

    Positions: ``packed_seq_params.local_position_ids(cp_size, cp_rank)`` (this rank's tokens);
    without packed params, every row is one causal document (positions ``0..S-1``, no CP).
    Extra constructor argument (give it through the ModuleSpec's ``params``): ``max_positions``,
    the number of positions the rotary table covers.
    """

    def __init__(self, *args: Any, max_positions: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rotary_pos_emb = PositionFollowingRotary(self.rotary_pos_emb, max_positions)

    def get_query_key_value_tensors(
        self,
        hidden_states: Tensor,
        key_value_states: Tensor | None = None,
        position_ids: Tensor | None = None,
        packed_seq_params: Any = None,
        inference_context: Any = None,
        **kwargs: Any,
    ):
        positions = self._positions(hidden_states, packed_seq_params)
        with self.rotary_pos_emb.following(positions), self._full_width_kv_down_projection():
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, None, None, inference_context=inference_context, **kwargs
            )

    @contextlib.contextmanager
    def _full_width_kv_down_projection(self) -> Iterator[None]:
        """While Megatron derives q, k and v under TP with sequence parallelism:
        ``linear_kv_down_proj`` returns the full width for this rank's tokens (see
        :class:`FullWidthKVDownProjection`)."""
        projection = self.linear_kv_down_proj
        if self.pg_collection.tp.size() == 1 or not self.config.sequence_parallel:
            yield
            return
        self.linear_kv_down_proj = FullWidthKVDownProjection(projection)
        try:
            yield
        finally:
            self.linear_kv_down_proj = projection

    def _positions(self, hidden_states: Tensor, packed_seq_params: Any) -> Tensor:
        from megatron_prefpack.attention import PrefPackSeqParams

        cp = self.pg_collection.cp
        cp_size, cp_rank = (cp.size(), cp.rank()) if cp is not None else (1, 0)
        if isinstance(packed_seq_params, PrefPackSeqParams):
            return packed_seq_params.local_position_ids(cp_size, cp_rank)
        if packed_seq_params is not None:
            raise TypeError(
                f"prefix-shared MLA needs PrefPackSeqParams (or None), got {type(packed_seq_params).__name__}"
            )
        if cp_size > 1:
            raise ValueError(
                "MLA under context parallelism needs PrefPackSeqParams for the tokens' positions"
            )
        seq_len = hidden_states.shape[0] * (
            self.pg_collection.tp.size() if self.config.sequence_parallel else 1
        )
        return torch.arange(seq_len, device=hidden_states.device).expand(hidden_states.shape[1], seq_len)
