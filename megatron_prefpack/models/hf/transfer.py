"""Moving weights between one rank's model chunk and Hugging Face tensors.

* :func:`fill_model` (import): every parameter of the chunk from a :class:`SafetensorsCheckpoint`;
* :func:`hf_tensors` (export): the HF tensors of the chunk's parameters, one at a time.

Both work on tensor-parallel-1 chunks (Megatron reshards checkpoints to any TP on load) of any
pipeline stage and expert-parallel rank, so a model larger than one host converts in CPU
processes that each hold a slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.hf.fields import ConversionError
from megatron_prefpack.models.hf.mapping import Architecture, ModelMapping
from megatron_prefpack.models.hf.safetensors_io import SafetensorsCheckpoint


def build_slice(
    cfg: ModelConfig,
    *,
    pipeline: int,
    expert: int,
    first_stage_layers: int | None,
    last_stage_layers: int | None,
) -> torch.nn.Module:
    """This rank's tensor-parallel-1 model chunk for a pipeline x expert split (the parallel
    state must already have that layout); a split Megatron refuses raises
    :class:`ConversionError` naming the command-line flags that asked for it."""
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.models.config import to_transformer_config

    try:
        tcfg = to_transformer_config(
            cfg,
            pipeline_parallel=pipeline,
            expert_parallel=expert,
            num_layers_in_first_pipeline_stage=first_stage_layers,
            num_layers_in_last_pipeline_stage=last_stage_layers,
        )
    except ValueError as err:
        raise ConversionError(
            f"--pipeline {pipeline} --expert {expert} --first-stage-layers {first_stage_layers} "
            f"--last-stage-layers {last_stage_layers}: {err}"
        ) from err
    return build_model(cfg, tcfg)


def _check_tensor_parallel_1() -> None:
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ConversionError("convert with tensor parallel 1 (the checkpoint reshards to any TP on load)")


@dataclass
class FillReport:
    """What :func:`fill_model` did: tensors filled, and HF tensors absent from the checkpoint
    that were filled with zeros as transformers does (``Architecture.zeros_when_missing``)."""

    filled: int = 0
    zero_filled: list[str] = field(default_factory=list)


def fill_model(
    model: torch.nn.Module,
    arch: Architecture,
    cfg: ModelConfig,
    ckpt: SafetensorsCheckpoint,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> FillReport:
    """Copy every parameter of this rank's ``model`` chunk (a ``build_model`` GPTModel) from
    ``ckpt``. Shapes must match exactly; ``progress(done, total)`` is called after each tensor."""
    _check_tensor_parallel_1()
    mapping = ModelMapping(arch, cfg, model)
    report = FillReport()
    for name, target, rule, _ in mapping.items():
        parts = []
        for hf_name in rule.hf_names:
            if hf_name not in ckpt and hf_name.endswith(arch.zeros_when_missing):
                report.zero_filled.append(hf_name)
                parts.append(torch.zeros(target.shape))
            else:
                parts.append(ckpt.read(hf_name))
        source = rule.join(parts)
        if source.shape != target.shape:
            raise ConversionError(
                f"{name}: checkpoint shape {tuple(source.shape)} (from {', '.join(rule.hf_names)}) "
                f"!= model {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(source.to(target.dtype))
        report.filled += 1
        if progress is not None:
            progress(report.filled, len(mapping.tensors))
    return report


def hf_tensors(
    model: torch.nn.Module,
    arch: Architecture,
    cfg: ModelConfig,
    *,
    reward: bool = False,
    replicated: bool = True,
    experts: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, tensor)`` for this chunk's parameters, in the parameters' dtype (detached views
    or reshaped copies; cast them as they are written).

    ``replicated`` / ``experts``: whether to give the non-expert / expert parameters (under
    expert or data parallelism only one rank of the group that holds the same tensor should
    write it). ``reward``: the output layer is the reward head (``score.weight``). A tied output
    layer is skipped (the embedding is written by the first stage)."""
    _check_tensor_parallel_1()
    for name, tensor, rule, is_expert in ModelMapping(arch, cfg, model, reward).items():
        if not (experts if is_expert else replicated):
            continue
        if name == "output_layer.weight" and cfg.tie_embeddings and not reward:
            continue
        yield from zip(rule.hf_names, rule.split(tensor.detach()), strict=True)
