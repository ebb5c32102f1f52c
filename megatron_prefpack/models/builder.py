"""Build a Megatron-Core ``GPTModel`` for prefix-shared rows from a :class:`ModelConfig`.

The layer specs are Megatron's own (``get_gpt_decoder_block_spec``: the Transformer Engine spec
when TE is importable on a CUDA machine, the local spec otherwise, with dense/MoE layers placed by
``moe_layer_freq``); three slots are then re-pointed, nothing is forked:

* ``self_attention.submodules.core_attention`` -> ``PrefixSharedAttention`` (``backend`` param);
* MLA ``self_attention`` -> :class:`~megatron_prefpack.models.rope.PositionFollowingMLASelfAttention`;
* MoE ``mlp.submodules.router`` -> :class:`~megatron_prefpack.models.moe.PadAwareTopKRouter`;
* MoE ``mlp`` -> :class:`~megatron_prefpack.models.moe.PostNormMoELayer` when ``moe.post_moe_norm``.

The model class is :class:`~megatron_prefpack.models.rope.PositionFollowingGPTModel` (RoPE from
``position_ids``; learned absolute embeddings already read ``position_ids`` in Megatron's
``LanguageModelEmbedding``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_prefpack.models.config import ModelConfig, to_transformer_config
from megatron_prefpack.models.moe import PadAwareTopKRouter, PostNormMoELayer
from megatron_prefpack.models.rope import PositionFollowingGPTModel, PositionFollowingMLASelfAttention
from megatron_prefpack.platform.features import has_transformer_engine, installed

_GPT_POSITION_EMBEDDING = {"rope": "rope", "yarn": "rope", "learned": "learned_absolute"}
"""``ModelConfig.position_embedding`` -> GPTModel's. MLA applies its own (YaRN) RoPE, so GPTModel
gets ``"rope"``, which it skips for MLA."""


def use_transformer_engine(cfg: ModelConfig) -> bool:
    """Whether the TE layer spec is used: CUDA present, Transformer Engine importable, and no
    LoRA (its adapters wrap Megatron's own parallel linears, not TE's)."""
    return has_transformer_engine() and cfg.lora is None


def _mark_mla_without_te() -> None:
    """Without Transformer Engine, megatron-core 0.16.1's MLA module still sets ``HAVE_TE = True``
    (its TE import resolves to mock stubs) and then calls ``isinstance(..., TELinear)`` on a mock,
    which raises while building MLA. Tell it the truth; 0.19.2 already gets this right."""
    from megatron.core.transformer import multi_latent_attention

    if not installed("transformer_engine"):
        multi_latent_attention.HAVE_TE = False


def parallel_layout() -> dict[str, Any]:
    """The parallel sizes of the initialized ``parallel_state``, as ``to_transformer_config`` kwargs."""
    return dict(
        tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_parallel=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel=parallel_state.get_context_parallel_world_size(),
        expert_parallel=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel=parallel_state.get_expert_tensor_parallel_world_size(),
        virtual_pipeline_parallel=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    )


def prefpack_block_spec(
    cfg: ModelConfig, transformer_config: Any, *, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """Megatron's decoder block spec for this pipeline stage with the prefix-shared slots filled."""
    from megatron_prefpack.attention import PrefixSharedAttention

    _mark_mla_without_te()
    block = get_gpt_decoder_block_spec(
        transformer_config,
        use_transformer_engine=use_transformer_engine(cfg),
        normalization="RMSNorm",
        vp_stage=vp_stage,
    )
    core_attention = ModuleSpec(module=PrefixSharedAttention, params={"backend": cfg.attention_backend})
    patched: dict[int, ModuleSpec] = {}
    layer_specs = []
    for spec in block.layer_specs:
        # Dense and MoE layers share spec objects; patch each distinct one once, on a copy.
        if id(spec) not in patched:
            patched[id(spec)] = _patch_layer_spec(spec, cfg, core_attention, block.layer_norm)
        layer_specs.append(patched[id(spec)])
    block.layer_specs = layer_specs
    return block


def _patch_layer_spec(
    spec: ModuleSpec, cfg: ModelConfig, core_attention: ModuleSpec, norm: type | ModuleSpec
) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = core_attention
    if attention.module is MLASelfAttention:
        attention.module = PositionFollowingMLASelfAttention
        attention.params = {**attention.params, "max_positions": cfg.max_position_embeddings}
    moe = _moe_spec_parts(spec.submodules.mlp)
    if moe is not None:
        module, submodules, params = moe
        submodules = dataclasses.replace(submodules, router=PadAwareTopKRouter)
        if cfg.moe is not None and cfg.moe.post_moe_norm:
            module, params = PostNormMoELayer, {**params, "post_norm": norm}
        spec.submodules.mlp = _same_form(spec.submodules.mlp, module, submodules, params)
    return spec


def _moe_spec_parts(mlp: Any) -> tuple[type, Any, dict[str, Any]] | None:
    """``(module, submodules, params)`` of an ``MoELayer`` mlp spec, else None.

    megatron-core 0.16 writes the mlp slot as ``ModuleSpec(module=MoELayer, submodules=...)``,
    0.19 as ``functools.partial(MoELayer, submodules=...)``.
    """
    if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
        return mlp.module, mlp.submodules, dict(mlp.params)
    if isinstance(mlp, functools.partial) and mlp.func is MoELayer:
        params = dict(mlp.keywords)
        return mlp.func, params.pop("submodules"), params
    return None


def _same_form(original: Any, module: type, submodules: Any, params: dict[str, Any]) -> Any:
    if isinstance(original, ModuleSpec):
        return ModuleSpec(module=module, submodules=submodules, params=params)
    return functools.partial(module, submodules=submodules, **params)


def build_model(
    cfg: ModelConfig,
    transformer_config: Any = None,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> PositionFollowingGPTModel:
    """The model chunk of this rank (Megatron's ``parallel_state`` must be initialized).

    ``transformer_config`` defaults to ``to_transformer_config(cfg, **parallel_layout())``.
    ``pre_process``/``post_process`` default to whether this rank (and ``vp_stage``) holds the
    first/last pipeline stage. With ``cfg.lora`` the decoder's target linears carry LoRA
    adapters (:func:`~megatron_prefpack.models.lora.apply_lora`; nothing is frozen here). Parameters are created in ``cfg.params_dtype`` on the current
    device (CUDA when available); wrapping (DDP, ``Float16Module``) is the caller's.
    """
    tcfg = (
        transformer_config
        if transformer_config is not None
        else to_transformer_config(cfg, **parallel_layout())
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = PositionFollowingGPTModel(
        config=tcfg,
        transformer_layer_spec=prefpack_block_spec(cfg, tcfg, vp_stage=vp_stage),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=_GPT_POSITION_EMBEDDING[cfg.position_embedding],
        rotary_percent=cfg.rotary_percent,
        # Not int(): transformers computes the frequencies from the float rope_theta.
        rotary_base=cfg.rotary_base,
        llama3_rope=cfg.llama3_rope,
        vp_stage=vp_stage,
    )
    if cfg.lora is not None:
        from megatron_prefpack.models.lora import apply_lora

        apply_lora(model, cfg.lora)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
