"""Context parallelism for prefix-shared rows: load-balanced sharding and the K/V all-gather.

A row of ``S`` tokens is cut into ``2 * CP`` equal chunks; rank ``r`` holds chunks ``r`` and
``2 * CP - 1 - r`` (Megatron's ``get_batch_on_this_cp_rank`` layout, so causal work is
balanced). Attention all-gathers K and V over the CP group (reduce-scatter of their
gradients in backward) and runs locally with the plan restricted to the rank's queries.
Transformer Engine's own CP refuses bottom-right masks, hence this module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def cp_positions(
    seq_len: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Row positions (int64, ``(seq_len // cp_size,)``, in local order) held by ``cp_rank``."""
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 * context_parallel_size = {2 * cp_size}"
        )
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for context_parallel_size {cp_size}")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_for_cp(t: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The part of ``t`` (full rows along ``dim``) that ``cp_rank`` holds, in local order."""
    return t.index_select(dim, cp_positions(t.shape[dim], cp_size, cp_rank, t.device))


def _rank_shards(full: torch.Tensor, cp_size: int) -> list[torch.Tensor]:
    """Split sequence-first ``full`` into each rank's local shard."""
    chunks = full.chunk(2 * cp_size, dim=0)
    return [torch.cat([chunks[r], chunks[2 * cp_size - 1 - r]]) for r in range(cp_size)]


def _row_order(shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`_rank_shards`: reassemble full rows from every rank's shard."""
    halves = [shard.chunk(2, dim=0) for shard in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)])


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        shards = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(shards, local.contiguous(), group=group)
        return _row_order(shards)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        size = dist.get_world_size(ctx.group)
        stacked = torch.cat(_rank_shards(grad, size)).contiguous()
        local = torch.empty(
            (stacked.shape[0] // size, *stacked.shape[1:]), dtype=grad.dtype, device=grad.device
        )
        dist.reduce_scatter_tensor(local, stacked, group=ctx.group)
        return local, None


def gather_sequence(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather sequence-first shards ``[S / CP, ...]`` into full rows ``[S, ...]`` in row order.

    Differentiable: the backward reduce-scatters (sums) the gradient back to the shards.
    """
    return _GatherSequence.apply(local, group)
