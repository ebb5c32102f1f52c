"""Run a function on N local processes, torchrun-style, and collect what each rank returns.

Usage from a test::

    from tests.distributed import run_distributed

    def _worker(scale: float) -> float:          # module level, so it can be pickled
        from megatron_prefpack.platform import distributed as dist_platform
        dist_platform.initialize(tensor_parallel=2)
        ...
        return value

    def test_something():
        values = run_distributed(_worker, 2, 0.5)   # [rank0_value, rank1_value]

Contract:
- every rank is a fresh process forked from a ``forkserver`` that imported torch and
  Megatron-Core once per test session (importing Megatron takes seconds; forking from a server
  that never ran a kernel or touched a process group keeps ranks free of inherited state). It
  sees the environment a launcher would give it: ``MASTER_ADDR=127.0.0.1``, a ``MASTER_PORT``
  that was free when the call began (one per call), ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, and ``OMP_NUM_THREADS=1`` (set before the server imported torch);
- ``fn(*args, **kwargs)`` runs on each rank; return values must be picklable (tensors are fine)
  and come back in rank order;
- the first rank that raises (or dies) fails the call: the other ranks are killed and a
  ``DistributedRunError`` carries that rank's full traceback; the same happens, naming the
  ranks still running, when ``timeout`` seconds pass;
- ranks are not daemonic, so they may start processes of their own (checkpoint writers,
  data-loader workers), as under torchrun; ``run_distributed`` kills them all before returning;
- if ``fn`` leaves ``torch.distributed`` initialized, the wrapper tears down Megatron's
  parallel state and the process group after a barrier, so ranks exit cleanly.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.forkserver
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

# Imported once by the fork server so each rank starts in a fraction of a second.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
]


class DistributedRunError(RuntimeError):
    """A rank failed, died or timed out inside ``run_distributed``."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (a fork server started inside inherits them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _teardown_distributed() -> None:
    """Destroy Megatron's parallel state and the default process group if ``fn`` left them up."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    with contextlib.suppress(ImportError):
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _context() -> mp.context.BaseContext:
    """The forkserver context, its server started (once) with torch single-threaded."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    with _environment({"OMP_NUM_THREADS": "1"}):
        multiprocessing.forkserver.ensure_running()
    return ctx


def _child(
    fn: Callable[..., Any],
    rank: int,
    env: dict[str, str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: mp.Queue,
) -> None:
    """Entry point of one rank: run ``fn`` and report ``(rank, ok, payload)`` on ``results``.

    The payload is pre-pickled with plain ``pickle`` so tensors travel by value, not through
    torch's shared-memory reducers (which break once the sending process has exited).
    """
    try:
        # Own process group, so _kill also reaches what the rank started (checkpoint writers,
        # Megatron's multiprocessing Manager), which would otherwise outlive the test run.
        os.setpgrp()
        os.environ.update(env)
        import torch

        torch.set_num_threads(1)
        value = fn(*args, **kwargs)
        _teardown_distributed()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, f"rank {rank} raised:\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def _kill(processes: list[mp.process.BaseProcess], grace: float) -> None:
    """Give ranks ``grace`` seconds to exit, then kill each rank's whole process group."""
    deadline = time.monotonic() + grace
    for proc in processes:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in processes:
        proc.join(timeout=10)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180, **kwargs: Any
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh ranks; return their results in rank order.

    ``fn`` must be a module-level (picklable) function. Raises ``DistributedRunError`` with the
    failing rank's traceback if any rank raises, exits without reporting, or the whole run takes
    longer than ``timeout`` seconds; all ranks are terminated before it raises.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    base_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }
    processes: list[mp.process.BaseProcess] = []
    grace = 0.0
    try:
        for rank in range(world_size):
            env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            proc = ctx.Process(target=_child, args=(fn, rank, env, args, kwargs, results), name=f"rank{rank}")
            proc.start()
            processes.append(proc)
        values = _collect(processes, results, world_size, timeout)
        grace = 30.0  # every rank reported: let them run their exit handlers
        return values
    finally:
        _kill(processes, grace)
        results.close()


def _collect(
    processes: list[mp.process.BaseProcess], results: mp.Queue, world_size: int, timeout: float
) -> list[Any]:
    """Drain ``results`` until every rank reported, one failed or died, or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    while len(values) < world_size:
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue.Empty:
            for rank, proc in enumerate(processes):
                # A rank that reported already may have exited; only silent deaths are failures.
                if rank not in values and not proc.is_alive() and results.empty():
                    raise DistributedRunError(
                        f"rank {rank} exited with code {proc.exitcode} without reporting a result"
                    ) from None
            if time.monotonic() > deadline:
                pending = sorted(set(range(world_size)) - set(values))
                raise DistributedRunError(
                    f"timed out after {timeout:.0f} s; ranks {pending} still running"
                ) from None
            continue
        if not ok:
            raise DistributedRunError(payload)
        values[rank] = pickle.loads(payload)
    return [values[rank] for rank in range(world_size)]


def fill_params_by_key(model: Any, seed: int = 0, std: float = 0.02) -> None:
    """Overwrite every parameter of a Megatron model with values that depend only on its global key.

    Megatron's own init is not layout-independent: an expert on EP rank 1 or a layer on pipeline
    stage 1 draws from a different point of the RNG stream than in a single process. This helper
    makes "same model, different layout" exact: for every tensor of ``model.sharded_state_dict()``
    (global key such as ``decoder.layers.mlp.experts.experts.linear_fc1.weight``, global shape
    including the layer/expert axes Megatron prepends) it draws the full global tensor from a
    generator seeded by ``(seed, key)`` and copies this rank's slice (``ShardedTensor.global_slice``)
    into the local parameter. Values: ``std * N(0, 1)``, or ``1 + std * N(0, 1)`` for norm weights.
    Works for TP/SP/EP/PP layouts; factories (e.g. split SwiGLU ``linear_fc1``) are built first.
    ``model`` is one model chunk (a ``MegatronModule`` with ``sharded_state_dict``), not DDP-wrapped.
    """
    import zlib

    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    leaves = _flatten_values(model.sharded_state_dict())
    for factory in [leaf for leaf in leaves if isinstance(leaf, ShardedTensorFactory)]:
        leaves.extend(_flatten_values(factory.build()))
    with torch.no_grad():
        for tensor in [leaf for leaf in leaves if isinstance(leaf, ShardedTensor)]:
            if tensor.data is None or tensor.flattened_range is not None:
                raise ValueError(f"{tensor.key}: cannot fill a sharded tensor without local data")
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(tensor.key.encode()))
            full = std * torch.randn(tensor.global_shape, generator=generator, dtype=torch.float64)
            is_norm_weight = tensor.key.endswith("weight") and "norm" in ".".join(tensor.key.split(".")[-2:])
            if is_norm_weight:
                full += 1.0
            tensor.data.copy_(full[tensor.global_slice()].reshape(tensor.data.shape))


def _flatten_values(tree: Any) -> list[Any]:
    """Leaves of a nested dict/list, in order."""
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _flatten_values(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _flatten_values(value)]
    return [tree]
