"""Process-group and Megatron parallel-state setup, the same call on a laptop, CI and a cluster.

``initialize`` reads the launcher's environment (torchrun: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
srun: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; nothing at all: one process), picks
NCCL with one GPU per local rank when CUDA is available and gloo on CPU (after
``enable_cpu_megatron``), initializes ``megatron.core.parallel_state`` with the requested layout
and seeds the RNGs the way Megatron expects. ``destroy`` undoes all of it;
``destroy(keep_process_group=True)`` keeps the process group so the same processes can
``initialize`` another layout.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value != "":
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def launch_env() -> LaunchEnv:
    """Rank, world size and local rank from torchrun's variables, else srun's, else a single process."""
    rank = _env_int(("RANK", "SLURM_PROCID"), 0)
    world_size = _env_int(("WORLD_SIZE", "SLURM_NTASKS"), 1)
    local_rank = _env_int(("LOCAL_RANK", "SLURM_LOCALID"), 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size} (check RANK/WORLD_SIZE)")
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def device() -> torch.device:
    """The device this rank computes on: its CUDA device under NCCL, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_layout(world_size: int, tp: int, pp: int, cp: int, ep: int, vpp: int | None) -> None:
    sizes = {"tensor_parallel": tp, "pipeline_parallel": pp, "context_parallel": cp, "expert_parallel": ep}
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel x "
            f"context_parallel = {tp} x {pp} x {cp} = {model_parallel}"
        )
    data_parallel = world_size // model_parallel
    # Experts use the attention ranks' TP x CP x DP block (expert TP = TP), so EP must divide CP x DP.
    if (data_parallel * cp) % ep:
        raise ValueError(
            f"expert_parallel={ep} must divide context_parallel x data_parallel = {cp} x {data_parallel} "
            f"(world size {world_size}, tensor_parallel={tp}, pipeline_parallel={pp})"
        )
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ValueError(
            f"virtual_pipeline_parallel={vpp} needs pipeline_parallel >= 2 (got {pp}) and a value >= 1"
        )


def _init_process_group(env: LaunchEnv, backend: str, timeout_minutes: float) -> None:
    timeout = timedelta(minutes=timeout_minutes)
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # A lone process needs no rendezvous: an in-memory store avoids picking a port.
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout
    )


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    expert_parallel: int = 1,
    virtual_pipeline_parallel: int | None = None,
    seed: int = 1234,
    timeout_minutes: float = 30.0,
) -> None:
    """Initialize ``torch.distributed``, Megatron's parallel state and the model-parallel RNG seeds.

    Expert tensor parallelism equals ``tensor_parallel``. The data-parallel size is what remains:
    ``world_size / (tensor_parallel * pipeline_parallel * context_parallel)``. If a process group
    already exists (the caller made it) it is reused; Megatron's parallel state must not exist yet.
    Seeds: the CPU generator gets ``seed`` on every rank, Megatron's tracker gets the usual
    per-TP/EP offsets (``model_parallel_cuda_manual_seed``), so weights initialized with
    ``use_cpu_initialization=True`` are identical slices of one master weight in every layout.
    ``timeout_minutes`` bounds every collective of the process groups created here: a stalled
    or dead peer makes the others raise instead of waiting forever.
    Raises ``ValueError`` for a layout that does not divide the world size.
    """
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mcore_tp

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("Megatron parallel state is already initialized; call destroy() first")
    env = launch_env()
    if dist.is_initialized():
        env = LaunchEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=env.local_rank)
    _check_layout(
        env.world_size,
        tensor_parallel,
        pipeline_parallel,
        context_parallel,
        expert_parallel,
        virtual_pipeline_parallel,
    )

    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        from megatron_prefpack.platform.cpu import enable_cpu_megatron

        backend = "gloo"
        enable_cpu_megatron()
    if not dist.is_initialized():
        _init_process_group(env, backend, timeout_minutes)

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=tensor_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    mcore_tp.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy(keep_process_group: bool = False) -> None:
    """Tear down Megatron's parallel state and, unless ``keep_process_group``, the default group.

    Keep the process group to ``initialize`` another layout in the same processes: a new
    rendezvous on the same ``MASTER_PORT`` races with the old store's shutdown.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()


def progress(prog: str, message: str) -> None:
    """Print ``[prefpack] <prog>: <message>`` on global rank 0 only (progress of a collective job)."""
    if dist.get_rank() == 0:
        print(f"[prefpack] {prog}: {message}", flush=True)


def any_rank_failed(error: str | None, prog: str) -> bool:
    """Collective: whether any rank passed an ``error`` (None = it did fine). Every rank gets
    the same answer, so all stop together (none waits on a peer that gave up); rank 0 prints
    each distinct failure once to stderr as ``<prog>: <error> (rank r, ...)``."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if dist.get_rank() == 0:
        for message in dict.fromkeys(e for e in errors if e is not None):
            ranks = ", ".join(str(r) for r, e in enumerate(errors) if e == message)
            print(f"{prog}: {message} (rank {ranks})", file=sys.stderr)
    return any(e is not None for e in errors)
