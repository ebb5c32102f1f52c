"""Distributed checkpoints: crash-safe saves, exact resume, weights-only starts.

Layout of a save directory::

    <save>/iter_0000100/            one complete checkpoint
        (Megatron dist_checkpointing files: model, optimizer)
        rank_state/rank00003.pt     per-rank RNG states
        prefpack.json               step, data position, scheduler, objective, config
    <save>/latest                   text file: "iter_0000100"

A checkpoint is written to ``iter_XXXXXXX.partial`` and renamed only after every rank
finished writing, then ``latest`` is replaced atomically; a crash mid-save leaves the
previous checkpoint and pointer untouched (the partial directory is overwritten next time).
Older complete checkpoints beyond ``keep`` are removed after the pointer moved.

Model and optimizer go through ``megatron.core.dist_checkpointing`` (torch_dist backend),
so a checkpoint can be loaded under another parallel layout. All functions are collective:
every rank calls them with its own model chunks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
META = "prefpack.json"
_ITER = re.compile(r"^iter_(\d{7})$")
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""The distributed optimizer's state is saved per DP shard (fully parallel, no gather), as
Megatron-LM does by default: it reloads under a different DP size, but not under a different
TP/PP/EP layout (weights always do)."""


@dataclass
class CheckpointState:
    """What a checkpoint records besides tensors (``prefpack.json``)."""

    step: int
    consumed_rows: int
    scheduler: dict[str, Any] | None
    objective: str
    config_yaml: str
    world_size: int


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iteration_dir(save_dir: Path, step: int) -> Path:
    return save_dir / f"iter_{step:07d}"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory: ``path`` itself if it holds ``prefpack.json``, else the one its
    ``latest`` pointer names. Raises ``FileNotFoundError`` with what was looked for."""
    path = Path(path)
    if (path / META).is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        target = path / pointer.read_text().strip()
        if (target / META).is_file():
            return target
        raise FileNotFoundError(f"{pointer} names {target.name}, which is not a complete checkpoint")
    raise FileNotFoundError(f"{path}: neither a checkpoint (no {META}) nor a save dir (no {LATEST} file)")


def has_checkpoint(save_dir: str | Path) -> bool:
    """Whether ``save_dir`` holds a complete checkpoint behind its ``latest`` pointer."""
    try:
        resolve(save_dir)
    except FileNotFoundError:
        return False
    return True


def read_state(path: str | Path) -> CheckpointState:
    """The ``prefpack.json`` of the checkpoint at (or pointed to by) ``path``."""
    return CheckpointState(**json.loads((resolve(path) / META).read_text()))


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _sharded_state(
    model_chunks: list[torch.nn.Module], optimizer: Any | None, is_loading: bool
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i, chunk in enumerate(model_chunks):
        state[_model_key(i, len(model_chunks))] = _unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=_OPTIMIZER_METADATA
        )
    return state


def _materialize_optimizer_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer the state that the checkpoint will overwrite.

    Megatron's ``DistributedOptimizer`` can only describe (and so load) optimizer state that
    exists. With TE/Apex Adam it creates it itself; with torch's Adam (CPU, no TE/Apex) the
    state, including Adam's ``step``, appears only at the first step, and ``state_dict()``
    asserts. Megatron's own dummy step (zero gradients) creates it; ``load`` then replaces
    every value it touched: parameters, moments and step. ``optimizer`` may be a
    ``ChainedOptimizer`` (dense + expert parameters): each member is handled."""
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(member, "_init_optimizer_states_with_dummy_values") and not member.optimizer.state:
            member._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer: Any) -> None:
    """Set each parameter's Adam ``step`` from the loaded checkpoint after a load.

    Without TE/Apex (CPU), torch's Adam keeps ``step`` per parameter, and
    ``DistributedOptimizer`` saves it in its param groups. Its load restores the moments but
    leaves the per-parameter steps at the dummy step's 1 (and, where it sets them, shares one
    tensor that foreach Adam would advance once per parameter): Adam's bias correction
    would be wrong from the first step after resume. Each parameter gets its own tensor
    holding its group's loaded step."""
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = member.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if "step" in inner.state.get(param, {}):
                    inner.state[param]["step"] = torch.tensor(float(group["step"]))


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    save_dir: str | Path,
    state: CheckpointState,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    keep: int,
) -> Path:
    """Save a complete checkpoint for ``state.step``; returns its directory.

    Collective. ``keep`` > 0 removes all but the newest ``keep`` complete checkpoints."""
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, state.step)
    partial = final.with_name(final.name + ".partial")
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    dist_checkpointing.save(_sharded_state(model_chunks, optimizer, is_loading=False), str(partial))
    rank_dir = partial / "rank_state"
    rank_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rank_dir / f"rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        (partial / META).write_text(json.dumps(state.__dict__, indent=1))
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp_pointer = save_dir / f".{LATEST}.tmp"
        tmp_pointer.write_text(final.name + "\n")
        os.replace(tmp_pointer, save_dir / LATEST)
        if keep > 0:
            _prune(save_dir, keep, final.name)
    _barrier()
    return final


def _prune(save_dir: Path, keep: int, current: str) -> None:
    complete = sorted(p for p in save_dir.iterdir() if _ITER.match(p.name) and (p / META).is_file())
    for old in complete[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def load(
    path: str | Path,
    model_chunks: list[torch.nn.Module],
    optimizer: Any | None = None,
    restore_rng: bool = True,
) -> CheckpointState:
    """Load weights (and, with ``optimizer``, the optimizer state) from ``path``.

    ``path`` is a checkpoint or a save dir with a ``latest`` pointer. The model chunks must
    be built (any parallel layout) before the call. RNG states are restored when
    ``restore_rng`` and the checkpoint was written by a job of the same world size.
    Returns the checkpoint's :class:`CheckpointState` (the caller restores the scheduler and
    the data position from it)."""
    from megatron.core import dist_checkpointing

    ckpt = resolve(path)
    state = read_state(ckpt)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    sharded = _sharded_state(model_chunks, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(ckpt))
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=True)
    if optimizer is not None:
        # Without a separate fp32 master copy (fp32 training), the distributed optimizer's
        # main-parameter shards are views of the model's leaf parameters: copying the loaded
        # values into them must not be recorded by autograd.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    rank_file = ckpt / "rank_state" / f"rank{_rank():05d}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if restore_rng and state.world_size == world and rank_file.is_file():
        _set_rng_state(torch.load(rank_file, weights_only=False))
    return state
