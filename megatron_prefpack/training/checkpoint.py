"""Distributed checkpoints: crash-safe saves, verified loads, resume that cannot go backwards.

Layout of a save directory::

    <save>/iter_0000100/            one complete checkpoint
        (Megatron dist_checkpointing files: model, optimizer)
        rank_state/rank00003.pt     per-rank RNG states (plain tensors and numbers)
        prefpack.json               step, data position, scheduler, objective, config
        manifest.json               every other file's relative path, size and sha256
    <save>/latest                   text file: "iter_0000100"
    <save>/best.json                with checkpoint.keep_best: the best checkpoints, ranked

Saving. Every rank writes into ``iter_XXXXXXX.partial``; the files are hashed (split across
ranks), ``prefpack.json`` and then ``manifest.json`` are written, and only then is the
directory renamed and ``latest`` replaced atomically. A step saved again (a requeued job that
had finished) first moves the old directory to ``iter_XXXXXXX.replaced`` and removes it once
the new one is in place and ``latest`` names it. Older checkpoints beyond ``keep`` go last,
except the best ``keep_best`` by a held-out metric (:class:`BestPolicy`): each checkpoint's
``prefpack.json`` records the evaluation at its step, so the ranking is rebuilt from the
checkpoints themselves after any crash or restart; ``best.json`` (replaced atomically after
each save) lists it.
After a crash at any point, :func:`find_resume` finds a complete checkpoint at least as new as
the last save that returned.

Loading verifies the manifest first (split across ranks; the first file that differs, is
missing or is not listed stops the load, named), then reads Megatron's files through
:func:`~megatron_prefpack.training.safe_pickle.restricted_reads`: nothing in a checkpoint can
run code in the process that loads it.

LoRA (``model.lora``). A LoRA run's checkpoint holds only what the run trains (the adapters,
and a reward head if any) with their optimizer state, schedule, data position and RNG; its
``prefpack.json`` names the full checkpoint the adapters apply to (``base``: path, step and
manifest digest). :func:`load` reads such a checkpoint as base + adapters (the base must still
be there, unchanged), and a full checkpoint into a LoRA model as its base weights (the adapters
keep their initialisation: B = 0, the base model exactly).

Model and optimizer go through ``megatron.core.dist_checkpointing`` (torch_dist format,
written by each process itself: no writer processes that could outlive it), so a checkpoint
can be loaded under another parallel layout. Every function that takes model chunks, and
:func:`find_resume`, is collective: every rank calls it; rank 0 reads the directory and
decides, the other ranks follow its broadcast, so all ranks return or raise alike.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import random
import re
import shutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_prefpack.data.json_files import read_json_object
from megatron_prefpack.training.safe_pickle import RefusedPickle, load_weights_only, restricted_reads

LATEST = "latest"
BEST = "best.json"
META = "prefpack.json"
MANIFEST = "manifest.json"
RANK_STATE = "rank_state"
_PARTIAL = ".partial"
_REPLACED = ".replaced"
_ITER = re.compile(r"^iter_(\d{7})$")
_CANDIDATE = re.compile(r"^iter_(\d{7})(\.replaced)?$")
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""The distributed optimizer's state is saved per DP shard (fully parallel, no gather), as
Megatron-LM does by default: it reloads under a different DP size, but not under a different
TP/PP/EP layout (weights always do)."""

_T = TypeVar("_T")


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, incomplete, corrupt, unsafe, or not fitting
    the model). The message starts with the file or directory at fault."""


@dataclass
class CheckpointState:
    """What a checkpoint records besides tensors (``prefpack.json``). New fields need
    defaults: older ``prefpack.json`` files must still load."""

    step: int
    consumed_rows: int
    scheduler: dict[str, Any] | None
    objective: str
    config_yaml: str
    world_size: int
    base: dict[str, Any] | None = None
    """A LoRA run's checkpoint: the :func:`identity` of the full checkpoint its adapters apply
    to (its tensors hold only what the run trains). None: a full checkpoint."""
    eval: dict[str, float] | None = None
    """The held-out metrics of the evaluation at this step (finite values only), which rank
    the checkpoint for :class:`BestPolicy`. None: not evaluated at its step."""

    @property
    def weights_only(self) -> bool:
        """Whether the checkpoint holds weights but no training state to resume (optimizer and
        LR schedule): what ``prefpack merge`` and ``prefpack merge-lora`` write (``scheduler``
        None); ``prefpack train`` always saves its schedule."""
        return self.scheduler is None


@dataclass(frozen=True)
class BestPolicy:
    """``checkpoint.keep_best``: pruning also keeps the ``keep`` complete checkpoints whose
    recorded evaluation has the lowest (``mode="min"``) or highest (``"max"``) finite
    ``metric``; at equal values the newer one ranks first. Checkpoints without that metric are
    not ranked."""

    keep: int
    metric: str
    mode: Literal["min", "max"]


@dataclass
class ResumePoint:
    """Where a save dir's run continues: a complete, verified checkpoint, and what was passed
    over to find it (e.g. ``"latest names iter_0000008, which is not usable: ...;
    falling back to iter_0000006"``), for the log."""

    path: Path
    notes: list[str]


# ----------------------------------------------------------------------------- collectives


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(value: _T) -> _T:
    """Rank 0's ``value`` on every rank (the others pass a placeholder)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(value: _T) -> list[_T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _decided_by_rank0(fn: Callable[..., _T], *args: Any) -> _T:
    """Collective: ``fn(*args)`` run on rank 0; its result, or its error as a
    :class:`CheckpointError`, on every rank (the filesystem is read once, and all ranks act
    on the same reading)."""
    outcome: tuple[bool, Any] = (True, None)
    if _rank() == 0:
        try:
            outcome = (True, fn(*args))
        except CheckpointError as err:
            outcome = (False, str(err))
        except OSError as err:
            outcome = (False, f"{err.filename}: {err.strerror}" if err.filename else str(err))
    ok, value = _from_rank0(outcome)
    if not ok:
        raise CheckpointError(value)
    return value


def _raise_if_any(error: str | None, cause: BaseException | None) -> None:
    """Collective: raise ``CheckpointError`` on every rank with the lowest failing rank's
    message (chained to this rank's ``cause``), so that no rank walks on into a collective
    its peers never reach."""
    errors = [e for e in _gathered(error) if e is not None]
    if errors:
        raise CheckpointError(errors[0]) from cause


# ----------------------------------------------------------------------------- filesystem


def _fs(op: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run one filesystem mutation of :func:`save`. Every mutation of a save (and of its
    pruning) goes through here, in order, so that a test can crash the process before each."""
    return op(*args, **kwargs)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` and flush it to disk (a rename that publishes it must not outrun it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename(src: Path, dst: Path) -> None:
    """``os.replace`` made durable: the parent directory is flushed too."""
    os.replace(src, dst)
    _fsync_dir(dst.parent)


def _replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: write ``.<name>.tmp`` beside it, then rename it over ``path``
    (two crash points: a reader sees the old file or the new one, never a torn one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    _fs(_write_bytes, tmp, data)
    _fs(_rename, tmp, path)


def _remove_tree(path: Path) -> None:
    """Remove a checkpoint directory: its manifest first, so that a crash halfway leaves a
    directory that nothing takes for complete."""
    if (path / MANIFEST).is_file():
        _fs(os.unlink, path / MANIFEST)
    _fs(shutil.rmtree, path)


def iteration_dir(save_dir: Path, step: int) -> Path:
    return save_dir / f"iter_{step:07d}"


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class _FileRecord:
    """One manifest entry: a file's path relative to the checkpoint, its size and sha256."""

    path: str
    size: int
    sha256: str


def _hash_file(path: Path) -> tuple[int, str]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return f.tell(), digest


def _listed_files(ckpt: Path) -> list[str]:
    """Every regular file under ``ckpt`` but the manifest, relative, sorted."""
    files = (p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    return sorted(f for f in files if f != MANIFEST)


def _hash_share(ckpt: Path, files: list[str]) -> dict[str, tuple[int, str]]:
    """Size and sha256 of this rank's share of ``files`` (every ``world``-th, from its rank)."""
    return {name: _hash_file(ckpt / name) for name in files[_rank() :: _world()]}


def write_manifest(ckpt: str | Path) -> None:
    """Collective: hash every file of the checkpoint ``ckpt`` (split across ranks) and record
    them in its ``manifest.json`` (rank 0 writes it). :func:`save` does this; call it yourself
    only to vouch for a checkpoint you trust, e.g. one written before checkpoints had
    manifests."""
    ckpt = Path(ckpt)
    files = _decided_by_rank0(_listed_files, ckpt)
    shares = _gathered(_hash_share(ckpt, files))
    if _rank() == 0:
        hashed = {name: value for share in shares for name, value in share.items()}
        records = [dataclasses.asdict(_FileRecord(name, *hashed[name])) for name in files]
        text = json.dumps({"version": 1, "algorithm": "sha256", "files": records}, indent=1)
        _fs(_write_bytes, ckpt / MANIFEST, text.encode())


def _read_manifest(ckpt: Path) -> list[_FileRecord]:
    """The records of ``ckpt/manifest.json``; raises :class:`CheckpointError` naming it."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing: {ckpt} is not a complete checkpoint (its save did not finish, or "
            "it was written before checkpoints had manifests: see checkpoint.write_manifest)"
        )
    data = read_json_object(path, CheckpointError)
    try:
        return [_FileRecord(str(r["path"]), int(r["size"]), str(r["sha256"])) for r in data["files"]]
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: not a valid manifest ({type(err).__name__}: {err})") from None


def _verification_plan(ckpt: Path) -> tuple[list[_FileRecord], list[str]]:
    """Rank 0's half of :func:`verify`: the manifest's records and the problems it can see
    without reading file contents (files present but not listed)."""
    records = _read_manifest(ckpt)
    listed = {r.path for r in records}
    extra = [f"{ckpt / name}: not in {MANIFEST}" for name in _listed_files(ckpt) if name not in listed]
    return records, extra


def _check_record(ckpt: Path, record: _FileRecord) -> str | None:
    """What is wrong with one file against its manifest record, or None."""
    path = ckpt / record.path
    expected = f"expected {record.size} bytes, sha256 {record.sha256[:16]}..."
    try:
        size = path.stat().st_size
        if size != record.size:
            return f"{path}: {expected}, found {size} bytes"
        _, digest = _hash_file(path)
    except FileNotFoundError:
        return f"{path}: {expected}, found no such file"
    except OSError as err:
        return f"{path}: {expected}, found an unreadable file ({err.strerror})"
    if digest != record.sha256:
        return f"{path}: {expected}, found sha256 {digest[:16]}..."
    return None


_Fingerprint = tuple[str, tuple[tuple[str, int, int], ...]]
_verified: set[_Fingerprint] = set()
"""Checkpoints this process verified, as their :func:`_fingerprint` at the time: a load right
after :func:`find_resume` does not hash the same files again."""


def _fingerprint(ckpt: Path) -> _Fingerprint | None:
    """Every file of ``ckpt`` (manifest included) with its size and modification time."""
    try:
        files = sorted(p for p in ckpt.rglob("*") if p.is_file())
        stats = tuple(
            (p.relative_to(ckpt).as_posix(), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]
        )
    except OSError:
        return None
    return str(ckpt.resolve()), stats


def verify(path: str | Path) -> None:
    """Collective: check every file of the checkpoint at ``path`` against its manifest
    (files split across ranks, results combined). Raises :class:`CheckpointError` on every
    rank naming the first file that differs (in manifest order), is missing, or is present
    but not listed. Skips the hashing when this process verified the checkpoint before and
    no file has changed size or modification time since."""
    ckpt = Path(path)
    key = _fingerprint(ckpt) if _rank() == 0 else None
    if _from_rank0(key is not None and key in _verified):
        return
    records, extra = _decided_by_rank0(_verification_plan, ckpt)
    mine = [
        (i, problem)
        for i, record in enumerate(records)
        if i % _world() == _rank() and (problem := _check_record(ckpt, record))
    ]
    problems = [m for _, m in sorted(item for share in _gathered(mine) for item in share)] + extra
    if problems:
        raise CheckpointError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if key is not None:
        _verified.add(key)


# ----------------------------------------------------------------------------- state file


def _read_state_file(ckpt: Path) -> CheckpointState:
    """Parse and type-check ``ckpt/prefpack.json``; raises :class:`CheckpointError` naming it."""
    from megatron_prefpack.training.config import ConfigError, coerce

    path = ckpt / META
    data = read_json_object(path, CheckpointError)
    fields = {f.name: f for f in dataclasses.fields(CheckpointState)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {unknown} (written by a newer version?)")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}")
    hints = typing.get_type_hints(CheckpointState)
    try:
        values = {name: coerce(value, hints[name], f"{path}: {name}") for name, value in data.items()}
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    return CheckpointState(**values)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory: ``path`` itself if it holds ``prefpack.json``, else the one its
    ``latest`` pointer names. Raises :class:`CheckpointError` saying what was looked for
    (:func:`find_resume` is the search that falls back to older checkpoints)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    pointer = path / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"{path}: neither a checkpoint (no {META}) nor a save dir (no {LATEST} file)")
    name = _pointer_target(pointer)
    if name is None or not (path / name / META).is_file():
        raise CheckpointError(f"{pointer}: does not name a complete checkpoint ({_pointer_text(pointer)!r})")
    return path / name


def read_state(path: str | Path) -> CheckpointState:
    """The ``prefpack.json`` of the checkpoint at (or pointed to by) ``path``."""
    return _read_state_file(resolve(path))


def _manifest_digest(ckpt: Path) -> str | None:
    manifest = ckpt / MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def identity(load: str | Path) -> dict[str, Any]:
    """What identifies a checkpoint's weights: resolved path, step and manifest digest."""
    path = resolve(load)
    return {
        "path": str(path.resolve()),
        "step": read_state(path).step,
        "manifest_sha256": _manifest_digest(path),
    }


def _recorded_base(ckpt: Path, base: dict[str, Any]) -> Path:
    """The base checkpoint that the LoRA checkpoint ``ckpt`` records, checked to be the one its
    adapters were trained on (same manifest digest); :class:`CheckpointError` otherwise."""
    path = Path(str(base.get("path")))
    why = "the run's adapters apply to it; restore it there, or merge elsewhere from a copy"
    if not (path / META).is_file():
        raise CheckpointError(f"{ckpt}: its base checkpoint {path} is gone ({why})")
    digest = _manifest_digest(path)
    if digest != base.get("manifest_sha256"):
        raise CheckpointError(
            f"{ckpt}: its base checkpoint {path} has changed (manifest sha256 "
            f"{str(base.get('manifest_sha256'))[:16]}... when the run started, now {str(digest)[:16]}...; {why})"
        )
    return path


# ----------------------------------------------------------------------------- resume


def _pointer_text(pointer: Path) -> str:
    try:
        return pointer.read_text(errors="replace").strip()
    except OSError as err:
        return f"<unreadable: {err.strerror}>"


def _pointer_target(pointer: Path) -> str | None:
    """The iteration a ``latest`` file names, or None if it names none (empty, garbage)."""
    text = _pointer_text(pointer)
    return text if _ITER.match(text) else None


def _step(checkpoint_dir: Path) -> int:
    """The step in a checkpoint directory's name (``iter_0000100``, ``iter_0000100.replaced``)."""
    return int(checkpoint_dir.name[5:12])


def _candidates(save_dir: Path) -> list[Path]:
    """Checkpoint directories of ``save_dir``, newest step first; at the same step the
    directory itself before the copy it replaced."""
    found = [p for p in save_dir.iterdir() if _CANDIDATE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: (-_step(p), p.name))


@dataclass
class _Survey:
    """Rank 0's reading of a save dir: what to try, in order, and what it noticed."""

    order: list[Path]
    notes: list[str]


def _survey(save_dir: Path) -> _Survey | None:
    """What :func:`find_resume` tries, or None when ``save_dir`` holds nothing checkpoint-like."""
    if not save_dir.is_dir():
        return None
    candidates = _candidates(save_dir)
    pointer = save_dir / LATEST
    if not pointer.exists():
        return _Survey(candidates, [f"{pointer} is missing"]) if candidates else None
    target = _pointer_target(pointer)
    if target is None:
        return _Survey(candidates, [f"{pointer} names no checkpoint ({_pointer_text(pointer)!r})"])
    if not (save_dir / target).is_dir():
        return _Survey(candidates, [f"{pointer} names {target}, which does not exist"])
    first = save_dir / target
    return _Survey([first] + [c for c in candidates if c != first], [])


def find_resume(save_dir: str | Path) -> ResumePoint | None:
    """Collective: the checkpoint a run in ``save_dir`` continues from.

    ``latest``'s checkpoint if it is complete and verifies; otherwise the newest one that
    does, with notes saying what was passed over and why. None only when ``save_dir`` holds
    nothing checkpoint-like (no ``latest``, no ``iter_*`` directory; unfinished
    ``.partial`` saves do not count). Raises :class:`CheckpointError` with every reason when
    it holds checkpoints but none is complete and intact: a run never restarts from step 0
    over a save dir it could not read. Rank 0 reads the directory; all ranks verify."""
    save_dir = Path(save_dir)
    survey = _decided_by_rank0(_survey, save_dir)
    if survey is None:
        return None
    notes = list(survey.notes)
    for i, candidate in enumerate(survey.order):
        try:
            _decided_by_rank0(_read_state_file, candidate)  # cheap checks before hashing
            verify(candidate)
        except CheckpointError as err:
            passed = (
                f"{LATEST} names {candidate.name}, which" if i == 0 and not survey.notes else candidate.name
            )
            notes.append(f"{passed} is not usable: {err}")
            continue
        if notes:
            notes.append(f"falling back to {candidate.name}")
        return ResumePoint(candidate, notes)
    raise CheckpointError(f"{save_dir}: no complete, intact checkpoint to resume from: " + "; ".join(notes))


# ----------------------------------------------------------------------------- model state


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def optimizer_members(optimizer: Any) -> list[Any]:
    """The optimizers inside a Megatron ``ChainedOptimizer`` (dense + expert), or ``[optimizer]``."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def lora_trained(model: torch.nn.Module) -> Callable[[str], bool]:
    """Whether a parameter (or checkpoint key) of the unwrapped ``model`` is one a LoRA run
    trains and saves: an adapter, or the reward head (``output_layer.*`` of a
    :class:`~megatron_prefpack.losses.reward.RewardHead`)."""
    from megatron_prefpack.losses.reward import RewardHead
    from megatron_prefpack.models.lora import is_adapter_parameter

    head = isinstance(getattr(model, "output_layer", None), RewardHead)
    return lambda name: is_adapter_parameter(name) or (head and name.startswith("output_layer."))


Part = Literal["all", "trained", "frozen", "base"]
"""Which of a model's checkpoint entries a save or load covers: ``all``; what a LoRA run trains
(``trained``: adapters and a reward head, :func:`lora_trained`)
or the rest (``frozen``); ``base``: all but the adapters (a full checkpoint read into a LoRA model)."""


def _part_filter(model: torch.nn.Module, part: Part) -> Callable[[str], bool]:
    """Whether a state-dict key of the unwrapped ``model`` belongs to ``part``."""
    from megatron_prefpack.models.lora import is_adapter_parameter

    trained = lora_trained(model)
    return {
        "all": lambda key: True,
        "trained": trained,
        "frozen": lambda key: not trained(key),
        "base": lambda key: not is_adapter_parameter(key),
    }[part]


def has_adapters(model_chunks: list[torch.nn.Module]) -> bool:
    """Whether the model carries LoRA adapters (``model.lora``)."""
    from megatron_prefpack.models.lora import is_adapter_parameter

    return any(is_adapter_parameter(name) for chunk in model_chunks for name, _ in chunk.named_parameters())


def _sharded_state(
    model_chunks: list[torch.nn.Module], optimizer: Any | None, is_loading: bool, part: Part = "all"
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for i, chunk in enumerate(model_chunks):
        model = _unwrap(chunk)
        keep = _part_filter(model, part)
        entries = model.sharded_state_dict()
        state[_model_key(i, len(model_chunks))] = {k: v for k, v in entries.items() if keep(k)}
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
    every value it touched: parameters, moments and step."""
    for member in optimizer_members(optimizer):
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
    for member in optimizer_members(optimizer):
        inner = member.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if "step" in inner.state.get(param, {}):
                    inner.state[param]["step"] = torch.tensor(float(group["step"]))


@functools.cache
def _save_strategy() -> Any:
    """Megatron's torch_dist format, written by the calling process itself.

    Megatron's own strategy hands the writing to a ``multiprocessing`` Manager (spawned once,
    lives as long as the trainer) and, under megatron-core 0.16, to worker processes forked
    for every save; after a ``kill -9`` of the trainer they live on. This one plans with
    Megatron's planner and writes with torch DCP's ``FileSystemWriter`` on one thread, so a
    save starts no process; the files are the same format (Megatron loads them in any
    layout)."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed import checkpoint as dcp

    class InProcessSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: Path) -> None:
            sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            dcp.save(
                mcore_to_pyt_state_dict(sharded, False),
                storage_writer=dcp.FileSystemWriter(checkpoint_dir, thread_count=1),
                planner=MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
                ),
            )

    return InProcessSaveStrategy("torch_dist", 1)


def _write_sharded(model_chunks: list[torch.nn.Module], optimizer: Any, directory: Path, part: Part) -> None:
    from megatron.core import dist_checkpointing

    state = _sharded_state(model_chunks, optimizer, is_loading=False, part=part)
    dist_checkpointing.save(state, str(directory), sharded_strategy=_save_strategy())


def _brief(err: BaseException, limit: int = 400) -> str:
    """An exception as one line for a message (Megatron's can list every key of the model)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _read_sharded(
    ckpt: Path, model_chunks: list[torch.nn.Module], optimizer: Any | None, part: Part = "all"
) -> None:
    """Load ``part`` of the weights (and optimizer state) from ``ckpt`` into this rank's
    objects; every entry of ``part`` must be loaded. Nothing read may unpickle more than data
    (see :mod:`~megatron_prefpack.training.safe_pickle`)."""
    from megatron.core import dist_checkpointing

    sharded = _sharded_state(model_chunks, optimizer, is_loading=True, part=part)
    with restricted_reads():
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    for i, chunk in enumerate(model_chunks):
        model = _unwrap(chunk)
        result = model.load_state_dict(loaded[_model_key(i, len(model_chunks))], strict=part == "all")
        keep = _part_filter(model, part)
        missing = [key for key in result.missing_keys if keep(key)]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{ckpt}: the {part} weights do not fit this model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    if optimizer is not None:
        # Without a separate fp32 master copy (fp32 training), the distributed optimizer's
        # main-parameter shards are views of the model's leaf parameters: copying the loaded
        # values into them must not be recorded by autograd.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)


# ----------------------------------------------------------------------------- RNG state


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, numbers and dicts only (loadable weights-only)."""
    from megatron.core import tensor_parallel

    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank_state_file(ckpt: Path) -> Path:
    return ckpt / RANK_STATE / f"rank{_rank():05d}.pt"


def _write_rank_state(ckpt: Path) -> None:
    path = _rank_state_file(ckpt)
    path.parent.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    torch.save(_rng_state(), buffer)
    _write_bytes(path, buffer.getvalue())


def _restore_rng(ckpt: Path) -> None:
    path = _rank_state_file(ckpt)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint's world size matches this job's)")
    try:
        _set_rng_state(load_weights_only(path))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not an RNG state of this version ({_brief(err)})") from None


# ----------------------------------------------------------------------------- save


def save(
    save_dir: str | Path,
    state: CheckpointState,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    keep: int,
    best: BestPolicy | None = None,
) -> Path:
    """Save a complete checkpoint for ``state.step``; returns its directory.

    Collective. Safe at every crash point (see the module docstring), also when
    ``state.step`` was saved before. ``keep`` > 0 then removes all but the newest ``keep``
    complete checkpoints, never the newest one nor the one ``latest`` names, nor, with
    ``best``, the best ``best.keep`` (listed in ``best.json`` first). A LoRA model saves what
    it trains only, and ``state.base`` must name its base checkpoint."""
    part: Part = "all"
    if has_adapters(model_chunks):
        if state.base is None:
            raise ValueError(
                "a LoRA model's checkpoint holds its adapters only: state.base must name its base"
            )
        part = "trained"
    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, state.step)
    partial = _sibling(final, _PARTIAL)
    if _rank() == 0:
        _fs(save_dir.mkdir, parents=True, exist_ok=True)
        if partial.exists():
            _fs(shutil.rmtree, partial)
        _fs(partial.mkdir)
    _barrier()
    _fs(_write_sharded, model_chunks, optimizer, partial, part)
    _fs(_write_rank_state, partial)
    _barrier()
    if _rank() == 0:
        _fs(_write_bytes, partial / META, json.dumps(dataclasses.asdict(state), indent=1).encode())
    write_manifest(partial)
    if _rank() == 0:
        _publish(save_dir, partial, final)
        ranked = _write_best(save_dir, best) if best is not None else []
        if keep > 0:
            _prune(save_dir, keep, final, ranked)
    _barrier()
    return final


def _publish(save_dir: Path, partial: Path, final: Path) -> None:
    """Move the complete ``partial`` to ``final`` and point ``latest`` at it. A ``final``
    that exists already (the step saved again) waits as ``.replaced`` until ``latest``
    names the new one, so some copy of the step is complete at every moment."""
    replaced = _sibling(final, _REPLACED)
    if final.exists():
        if replaced.exists():  # an earlier re-save crashed after its rename: final is the newer
            _remove_tree(replaced)
        _fs(_rename, final, replaced)
    _fs(_rename, partial, final)
    _replace_file(save_dir / LATEST, (final.name + "\n").encode())
    if replaced.exists():
        _remove_tree(replaced)


def best_checkpoints(save_dir: str | Path, policy: BestPolicy) -> list[tuple[Path, float]]:
    """The best ``policy.keep`` complete checkpoints of ``save_dir`` with their values, best
    first, ranked by the evaluation each ``prefpack.json`` records (see :class:`BestPolicy`);
    a checkpoint whose state file cannot be read is not ranked. Reads files only."""
    scored = []
    for ckpt in _candidates(Path(save_dir)):
        if not (_ITER.match(ckpt.name) and (ckpt / MANIFEST).is_file()):
            continue
        try:
            value = (_read_state_file(ckpt).eval or {}).get(policy.metric)
        except CheckpointError:
            continue
        if isinstance(value, (int, float)) and np.isfinite(value):
            scored.append((ckpt, float(value)))
    sign = 1.0 if policy.mode == "min" else -1.0
    scored.sort(key=lambda item: (sign * item[1], -_step(item[0])))
    return scored[: policy.keep]


def _write_best(save_dir: Path, policy: BestPolicy) -> list[Path]:
    """Replace ``best.json`` atomically with the current :func:`best_checkpoints`; returns them."""
    ranked = best_checkpoints(save_dir, policy)
    listing = {
        **dataclasses.asdict(policy),
        "best": [{"checkpoint": p.name, "step": _step(p), "value": v} for p, v in ranked],
    }
    _replace_file(save_dir / BEST, (json.dumps(listing, indent=1) + "\n").encode())
    return [p for p, _ in ranked]


def _prune(save_dir: Path, keep: int, current: Path, best: list[Path]) -> None:
    """Remove complete checkpoints beyond the newest ``keep`` (never ``current``, which
    ``latest`` names, nor the newest, nor those in ``best``), and what interrupted saves and
    removals left behind: unfinished ``.partial`` saves, and directories without a manifest
    older than ``current``."""
    candidates = _candidates(save_dir)
    complete = [p for p in candidates if (p / MANIFEST).is_file()]
    protected = {current, *complete[:keep], *best}
    for old in candidates:
        if old not in protected and (old in complete or _step(old) < _step(current)):
            _remove_tree(old)
    for leftover in save_dir.glob(f"iter_*{_PARTIAL}"):
        _fs(shutil.rmtree, leftover)


# ----------------------------------------------------------------------------- load


def load(
    path: str | Path,
    model_chunks: list[torch.nn.Module],
    optimizer: Any | None = None,
    restore_rng: bool = True,
) -> CheckpointState:
    """Load weights (and, with ``optimizer``, the optimizer state) from ``path``.

    ``path`` is a checkpoint or a save dir with a ``latest`` pointer. Collective. The
    checkpoint is verified against its manifest first; nothing it holds can run code. The
    model chunks must be built (any parallel layout) before the call. RNG states are
    restored when ``restore_rng`` and the checkpoint was written by a job of the same world
    size. Returns the checkpoint's :class:`CheckpointState` (the caller restores the
    scheduler and the data position from it). Every failure is a :class:`CheckpointError`
    naming the checkpoint, raised on every rank.

    LoRA: a LoRA checkpoint (``state.base`` set) loads as its recorded base checkpoint (which
    must be there, unchanged, and verifies) plus its own adapters (and reward head) and
    optimizer state; a full checkpoint loads into a LoRA model as its base weights only."""
    ckpt = _decided_by_rank0(resolve, path)
    verify(ckpt)
    state = _decided_by_rank0(_read_state_file, ckpt)
    lora = has_adapters(model_chunks)
    reads: list[tuple[Path, Any | None, Part]] = [(ckpt, optimizer, "all")]
    if state.base is not None:
        if not lora:
            raise CheckpointError(
                f"{ckpt}: holds LoRA adapters only: load it into the run's model (with its "
                "model.lora), or fold them into a full checkpoint with prefpack merge-lora"
            )
        base = _decided_by_rank0(_recorded_base, ckpt, state.base)
        verify(base)
        reads = [(base, None, "frozen"), (ckpt, optimizer, "trained")]
    elif lora:
        if optimizer is not None:
            raise CheckpointError(
                f"{ckpt}: a full checkpoint, not a LoRA run's: it can start a LoRA run as its "
                "base weights (checkpoint.load_optimizer: false), not resume one"
            )
        reads = [(ckpt, None, "base")]
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    error, cause = None, None
    try:
        for source, source_optimizer, part in reads:
            _read_sharded(source, model_chunks, source_optimizer, part)
        if restore_rng and state.world_size == _world():
            _restore_rng(ckpt)
    except (CheckpointError, RefusedPickle) as err:
        error, cause = str(err), err
    except (Exception, CheckpointException) as err:  # Megatron's and torch's: it does not fit
        error, cause = f"{ckpt}: cannot load into this model and optimizer: {_brief(err)}", err
    _raise_if_any(error, cause)
    return state
