"""One optimizer step and one evaluation pass on top of Megatron's pipeline schedules.

Loss normalisation: an objective (:mod:`megatron_prefpack.losses.objectives`) returns for a
micro-batch ``sum of its unit losses / global_count``, where ``global_count`` is the number of
units (pairs, groups, tokens, ...) in the whole global batch, counted before the step. Summed
over micro-batches and data-parallel ranks that is the global mean. Megatron's schedule then
divides what the loss function returns by ``num_microbatches`` (and multiplies by the CP size,
matched by DDP averaging over DP x CP), and Megatron DDP averages gradients over the DP ranks,
so :func:`_loss_func` returns ``loss * num_microbatches * dp_size`` to undo exactly that.
The MoE auxiliary loss keeps Megatron's own scaling: the schedule calls
``MoEAuxLossAutoScaler.set_loss_scale(1 / num_microbatches)`` after every micro-batch, which
with DDP's DP averaging makes it the mean over micro-batches and DP ranks.

Metrics come back from the last pipeline stage as per-micro-batch sums; one rank per DP
replica contributes them to a world all-reduce, so every rank ends with the global sums.

Non-finite steps: before the optimizer runs, every rank checks the global loss and its own
gradient buffers and the world agrees (one MAX all-reduce) whether anything is NaN/inf. Such
a step applies no update and does not advance the LR schedule (Megatron-LM's rule for a
skipped iteration); the caller counts it and decides when to stop. With ``ddp.overlap_grad_reduce``
the check still sees reduced gradients: the schedule ends with ``finalize_model_grads``, which
waits for every bucket's reduction. With ``ddp.overlap_param_gather`` a skipped step leaves the
parameter shards as they were, so the next forward's all-gather restores the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prefpack.data.batch import RowBatch
from megatron_prefpack.losses.objectives import Objective
from megatron_prefpack.models.forward import cp_local
from megatron_prefpack.training.metrics import reduce_sums

ModelForward = Callable[[torch.nn.Module, RowBatch], torch.Tensor]
ReferenceFn = Callable[[RowBatch], torch.Tensor]
"""``batch -> (N,)`` reference log-prob sums of the batch's responses, in batch order."""


@dataclass
class MicroBatch:
    """One micro-batch and what its loss needs. ``counted=False`` marks filler batches of an
    evaluation (run so every rank does the same number of forwards, metrics ignored)."""

    batch: RowBatch
    global_count: int
    counted: bool = True


def _loss_func(
    objective: Objective,
    reference: ReferenceFn | None,
    item: MicroBatch,
    grad_scale: float,
    output: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ref = reference(item.batch) if reference is not None else None
    out = objective(cp_local(item.batch), output, item.global_count, ref)
    weight = 1.0 if item.counted else 0.0
    metrics = {k: v.detach().double().cpu() * weight for k, v in out.metrics.items()}
    metrics["count"] = torch.tensor(float(out.count) * weight, dtype=torch.float64)
    return out.loss * grad_scale, metrics


def _forward_step(
    objective: Objective,
    reference: ReferenceFn | None,
    model_forward: ModelForward,
    grad_scale: float,
    data_iterator: Iterator[MicroBatch],
    model: torch.nn.Module,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Megatron ``forward_step_func``; the loss function runs on the last pipeline stage only."""
    item = next(data_iterator)
    output = model_forward(model, item.batch)
    return output, partial(_loss_func, objective, reference, item, grad_scale)


def run_schedule(
    model_chunks: list[torch.nn.Module],
    items: list[MicroBatch],
    forward_step: Callable[[Iterator[MicroBatch], torch.nn.Module], Any],
    forward_only: bool,
) -> list[Any]:
    """Megatron's forward(-backward) schedule for the current pipeline layout over ``items``;
    returns what the loss functions returned as second element (last stage; else [])."""
    schedule = get_forward_backward_func()
    iterators = [iter(items) for _ in model_chunks]  # every model chunk reads every micro-batch
    first = items[0].batch
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(items),
        seq_length=first.tokens.shape[1],
        micro_batch_size=first.tokens.shape[0],
        forward_only=forward_only,
    )


def is_reporting_rank() -> bool:
    """One rank per DP replica reports metric sums: last PP stage, TP rank 0, CP rank 0."""
    return (
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )


def global_count(objective: Objective, batches: list[RowBatch], device: torch.device) -> int:
    """Units of ``objective`` in this global batch: this rank's micro-batches summed over DP."""
    count = torch.tensor([sum(objective.count(b) for b in batches)], dtype=torch.int64, device=device)
    dist.all_reduce(count, group=ps.get_data_parallel_group())
    return int(count.item())


def _sum_metrics(
    outputs: list[dict[str, torch.Tensor]], keys: list[str], device: torch.device
) -> dict[str, float]:
    local = dict.fromkeys(keys, 0.0)
    for out in outputs:
        for key in keys:
            local[key] += float(out[key])
    return reduce_sums(local, is_reporting_rank(), device)


def moe_aux_losses(num_microbatches: int, num_moe_layers: int) -> dict[str, float]:
    """Megatron's MoE auxiliary-loss tracker as ``{"moe/<name>": mean per MoE layer and
    micro-batch}`` (unscaled by the loss coefficient), reduced over ranks; the tracker is
    cleared. Collective; empty for a dense model."""
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker or not num_moe_layers:
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks()
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    values = {
        f"moe/{name}": float(entry["values"].sum()) / num_moe_layers / num_microbatches
        for name, entry in tracker.items()
    }
    moe_utils.clear_aux_losses_tracker()
    return values


@dataclass
class StepResult:
    """Global metric sums (identical on every rank), MoE auxiliary losses and what the
    optimizer reported. ``nonfinite``: the loss or a gradient was NaN/inf somewhere, so no
    update was applied (identical on every rank)."""

    sums: dict[str, float]
    aux_losses: dict[str, float]
    grad_norm: float | None
    skipped: bool
    nonfinite: bool = False


def _grads_finite(model_chunks: list[torch.nn.Module]) -> bool:
    """Whether this rank's gradient buffers (dense and expert, after DDP's reduction) hold
    only finite values. A NaN/inf anywhere in a local buffer reaches some rank's reduced shard,
    so checking every rank's whole buffers and agreeing globally is exact."""
    for chunk in model_chunks:
        for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]:
            if not bool(torch.isfinite(buffer.grad_data).all()):
                return False
    return True


def all_finite(local_ok: bool, device: torch.device) -> bool:
    """True on every rank iff ``local_ok`` holds on every rank (one MAX all-reduce)."""
    flag = torch.tensor([0 if local_ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def train_step(
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    batches: list[RowBatch],
    objective: Objective,
    metric_keys: list[str],
    model_forward: ModelForward,
    reference: ReferenceFn | None,
    device: torch.device,
    num_moe_layers: int,
) -> StepResult:
    """One optimizer step over this rank's micro-batches of one global batch."""
    count = global_count(objective, batches, device)
    items = [MicroBatch(b, count) for b in batches]
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    grad_scale = len(batches) * ps.get_data_parallel_world_size()
    step = partial(_forward_step, objective, reference, model_forward, grad_scale)
    outputs = run_schedule(model_chunks, items, step, forward_only=False)
    sums = _sum_metrics(outputs, metric_keys, device)
    finite = all_finite(math.isfinite(sums["loss"]) and _grads_finite(model_chunks), device)
    success, grad_norm = False, None
    if finite:
        success, grad_norm, _ = optimizer.step()
        if success:
            scheduler.step(increment=1)
    aux = moe_aux_losses(len(batches), num_moe_layers)
    return StepResult(sums, aux, grad_norm, skipped=not success, nonfinite=not finite)


@torch.no_grad()
def evaluate(
    model_chunks: list[torch.nn.Module],
    items: list[MicroBatch],
    objective: Objective,
    metric_keys: list[str],
    model_forward: ModelForward,
    reference: ReferenceFn | None,
    device: torch.device,
) -> dict[str, float]:
    """Forward-only pass; global metric sums over ``items`` of all DP ranks."""
    for chunk in model_chunks:
        chunk.eval()
    step = partial(_forward_step, objective, reference, model_forward, 1.0)
    outputs = run_schedule(model_chunks, items, step, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    from megatron.core.transformer.moe import moe_utils

    moe_utils.clear_aux_losses_tracker()  # evaluation routing statistics are not training's
    return _sum_metrics(outputs, metric_keys, device)
