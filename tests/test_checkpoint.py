"""Checkpoint integrity (``training/checkpoint.py``, ``training/safe_pickle.py``) on a tiny MoE.

- a crash before any filesystem mutation of a save (a new step, or a step saved again)
  leaves a save dir that resumes from a complete checkpoint at least as new as the last save
  that returned, and the next save completes;
- resume discovery falls back past an empty, garbage, dangling or incomplete ``latest`` and
  past a corrupt checkpoint, says so, and never returns "start from 0" for a save dir that
  holds checkpoints;
- loads verify the manifest (a changed, truncated, missing or extra file is named); split
  across two ranks, both raise the same error;
- a pickle planted in any file a load reads (DCP ``.metadata``, ``common.pt``, an object in a
  ``.distcp`` shard, the rank state) is refused, named, and never runs;
- RNG states are plain data (``weights_only``) and come back exactly; an invalid
  ``prefpack.json`` or a checkpoint of another model is a ``CheckpointError`` naming it;
- ``kill -9`` in the middle of a save leaves no process of the trainer behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_prefpack.training import checkpoint
from megatron_prefpack.training.checkpoint import CheckpointError, CheckpointState
from tests.distributed import free_port, run_distributed

# ----------------------------------------------------------------------------- helpers


def _build(preset: str = "tiny-moe") -> tuple[list[torch.nn.Module], Any]:
    """A wrapped tiny model and its Adam after one step (so the optimizer has state)."""
    from megatron_prefpack.models import presets
    from megatron_prefpack.models.config import to_transformer_config
    from megatron_prefpack.training.config import TrainConfig
    from megatron_prefpack.training.model_setup import build_chunks, build_optimizer, wrap_for_training

    model_cfg = presets.preset(preset)
    tcfg = to_transformer_config(model_cfg)
    model = wrap_for_training(build_chunks(model_cfg, tcfg), tcfg, distributed_optimizer=False)
    optimizer = build_optimizer(TrainConfig(), model, tcfg)
    generator = torch.Generator().manual_seed(0)
    for chunk in model:
        for param in chunk.parameters():
            param.main_grad.copy_(1e-3 * torch.randn(param.shape, generator=generator))
    optimizer.step()
    return model, optimizer


@pytest.fixture
def tiny(megatron_single_process) -> tuple[list[torch.nn.Module], Any]:
    return _build()


def _state(step: int, world: int = 1) -> CheckpointState:
    return CheckpointState(step, 4 * step, None, "sft", "model: {preset: tiny-moe}\n", world)


def _save(save_dir: Path, step: int, tiny: tuple[list[torch.nn.Module], Any], keep: int = 0) -> Path:
    model, optimizer = tiny
    return checkpoint.save(save_dir, _state(step), model, optimizer, keep)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_shard(ckpt: Path) -> Path:
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _params(model: list[torch.nn.Module]) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in model for p in chunk.parameters()]


# ----------------------------------------------------------------------------- round trip


def _draws() -> list[float]:
    """One number from every generator a checkpoint restores."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(1).item()
    return [random.random(), float(np.random.rand()), torch.rand(1).item(), tracked]


def test_rank_state_is_plain_data_and_restores_every_generator(tiny, tmp_path):
    model, optimizer = tiny
    ckpt = _save(tmp_path, 1, tiny)
    rank_state = torch.load(ckpt / "rank_state" / "rank00000.pt", weights_only=True)
    assert set(rank_state) >= {"python", "numpy", "torch", "tracker"}
    expected, saved_params = _draws(), _params(model)
    _draws()
    for chunk in model:
        for p in chunk.parameters():
            p.data.add_(1.0)
    state = checkpoint.load(ckpt, model, optimizer)
    assert state == _state(1)
    assert _draws() == expected
    for got, want in zip(_params(model), saved_params, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_manifest_lists_every_file_with_size_and_sha256(tiny, tmp_path):
    import hashlib

    ckpt = _save(tmp_path, 1, tiny)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert [r["path"] for r in manifest["files"]] == [f for f in on_disk if f != "manifest.json"]
    assert {"prefpack.json", "rank_state/rank00000.pt", ".metadata"} <= {r["path"] for r in manifest["files"]}
    for record in manifest["files"]:
        data = (ckpt / record["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record["size"], record["sha256"])


# ----------------------------------------------------------------------------- integrity


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


DAMAGE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "flipped byte in a shard": (lambda c: _largest_shard(c), "found sha256"),
    "truncated shard": (lambda c: _largest_shard(c), r"found \d+ bytes$"),
    "deleted rank state": (lambda c: c / "rank_state" / "rank00000.pt", "found no such file"),
    "extra rank state": (lambda c: c / "rank_state" / "rank00001.pt", "not in manifest.json"),
    "deleted manifest": (lambda c: c / "manifest.json", "missing"),
}


def _damage(kind: str, target: Path) -> None:
    if kind == "flipped byte in a shard":
        _flip_byte(target)
    elif kind == "truncated shard":
        _truncate(target)
    elif kind == "extra rank state":
        shutil.copy(target.with_name("rank00000.pt"), target)
    else:
        target.unlink()


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "weights_only"])
def test_load_names_the_first_file_that_differs_from_the_manifest(kind, resume, tiny, tmp_path):
    model, optimizer = tiny
    ckpt = _save(tmp_path, 1, tiny)
    where, says = DAMAGE[kind]
    target = where(ckpt)
    _damage(kind, target)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(target))}: .*{says}"):
        checkpoint.load(ckpt, model, optimizer if resume else None, restore_rng=resume)


# ----------------------------------------------------------------------------- planted code


class _Payload:
    """Pickles to ``open(marker, "w")``: unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _plant_in_shard_object(ckpt: Path, marker: Path) -> Path:
    """Point one object of the checkpoint (a module's ``_extra_state``, stored in a shard)
    at a payload appended to its shard; returns that shard."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata_file = ckpt / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # the test wrote it: trusted here
    index, info = next(
        (i, s)
        for i, s in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    shard = ckpt / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload.getvalue()))
    metadata_file.write_bytes(pickle.dumps(metadata))
    return shard


def _plant(ckpt: Path, where: str, marker: Path) -> Path:
    """Put a payload into ``where`` of ``ckpt``; returns the file a refusal must name."""
    if where == "shard object":
        return _plant_in_shard_object(ckpt, marker)
    target = ckpt / where
    if where == ".metadata":
        target.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"state": _Payload(marker)}, target)
    return target


PLANTED = {
    ".metadata": [True, False],
    "common.pt": [True, False],
    "shard object": [True, False],
    "rank_state/rank00000.pt": [True],  # weights-only loads do not read the rank state
}


@pytest.mark.parametrize(
    ("where", "resume"),
    [(w, r) for w, modes in PLANTED.items() for r in modes],
    ids=[f"{w}-{'resume' if r else 'weights_only'}" for w, modes in PLANTED.items() for r in modes],
)
def test_planted_pickle_in_any_file_a_load_reads_is_refused_and_never_runs(where, resume, tiny, tmp_path):
    """The manifest is rewritten after planting (as an attacker would): the loaders
    themselves must refuse the payload."""
    model, optimizer = tiny
    ckpt = _save(tmp_path / "save", 1, tiny)
    if where == "common.pt" and not (ckpt / where).exists():
        pytest.skip("this megatron-core keeps its common state inside the shards (see 'shard object')")
    marker = tmp_path / "payload-ran"
    target = _plant(ckpt, where, marker)
    checkpoint.write_manifest(ckpt)
    with pytest.raises(
        CheckpointError, match=f"{re.escape(str(target))}: refused to unpickle (io|builtins).open"
    ):
        checkpoint.load(ckpt, model, optimizer if resume else None, restore_rng=resume)
    assert not marker.exists()


def test_metadata_unpickler_admits_checkpoint_records_only(tmp_path):
    from megatron_prefpack.training.safe_pickle import RefusedPickle, load_metadata

    good = tmp_path / "good"
    good.write_bytes(pickle.dumps({"shape": torch.Size([2, 3]), "dtype": torch.bfloat16}))
    with open(good, "rb") as f:
        assert load_metadata(f) == {"shape": torch.Size([2, 3]), "dtype": torch.bfloat16}
    bad = tmp_path / "bad"
    bad.write_bytes(pickle.dumps(os.getcwd))  # any callable outside the list
    with (
        open(bad, "rb") as f,
        pytest.raises(RefusedPickle, match=f"^{re.escape(str(bad))}: refused to unpickle posix.getcwd"),
    ):
        load_metadata(f)


# ----------------------------------------------------------------------------- state file


BAD_STATE = {
    "not JSON": ('{"step": 1,', "invalid JSON"),
    "a list": ("[1, 2]", "expected a JSON object"),
    "wrong type": (None, "step: expected an integer"),
    "unknown key": (None, "unknown keys \\['extra'\\]"),
    "missing key": (None, "missing keys \\['world_size'\\]"),
}


def _bad_state_text(kind: str) -> str:
    text, _ = BAD_STATE[kind]
    if text is not None:
        return text
    fields = dataclasses.asdict(_state(1))
    if kind == "wrong type":
        fields["step"] = "three"
    elif kind == "unknown key":
        fields["extra"] = 1
    else:
        del fields["world_size"]
    return json.dumps(fields)


@pytest.mark.parametrize("kind", list(BAD_STATE))
def test_invalid_prefpack_json_is_an_error_naming_it(kind, tmp_path):
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / "prefpack.json").write_text(_bad_state_text(kind))
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(ckpt / 'prefpack.json'))}:.*{BAD_STATE[kind][1]}"
    ):
        checkpoint.read_state(ckpt)


def test_invalid_prefpack_json_stops_a_load_even_with_a_matching_manifest(tiny, tmp_path):
    model, optimizer = tiny
    ckpt = _save(tmp_path, 1, tiny)
    (ckpt / "prefpack.json").write_text('{"step": "one"}')
    checkpoint.write_manifest(ckpt)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(ckpt / 'prefpack.json'))}: "):
        checkpoint.load(ckpt, model, optimizer)


def test_checkpoint_of_another_model_is_an_error_naming_it(tiny, tmp_path):
    ckpt = _save(tmp_path, 1, tiny)
    dense, _ = _build("tiny-dense")
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(ckpt))}: cannot load into this model"):
        checkpoint.load(ckpt, dense, None, restore_rng=False)


# ----------------------------------------------------------------------------- resume


def _two_checkpoints(save_dir: Path, tiny: tuple[list[torch.nn.Module], Any]) -> None:
    _save(save_dir, 1, tiny)
    _save(save_dir, 2, tiny)


def _incomplete_newest(save_dir: Path) -> None:
    """What the issue saw: ``latest`` names a directory without ``prefpack.json``."""
    (save_dir / "iter_0000003").mkdir()
    (save_dir / "iter_0000003" / ".metadata").write_bytes(b"")
    (save_dir / "latest").write_text("iter_0000003\n")


FALLBACKS: dict[str, tuple[Callable[[Path], Any], int, list[str]]] = {
    "latest empty": (lambda d: (d / "latest").write_text(""), 2, ["names no checkpoint ('')"]),
    "latest garbage": (lambda d: (d / "latest").write_bytes(b"\x00\xff../etc"), 2, ["names no checkpoint"]),
    "latest dangling": (
        lambda d: (d / "latest").write_text("iter_0000009"),
        2,
        ["names iter_0000009, which does not exist"],
    ),
    "latest missing": (lambda d: (d / "latest").unlink(), 2, ["latest is missing"]),
    "latest incomplete": (
        _incomplete_newest,
        2,
        ["latest names iter_0000003, which is not usable: ", "prefpack.json", "falling back to iter_0000002"],
    ),
    "latest corrupt": (
        lambda d: _flip_byte(_largest_shard(d / "iter_0000002")),
        1,
        [
            "latest names iter_0000002, which is not usable: ",
            ".distcp: expected",
            "falling back to iter_0000001",
        ],
    ),
    "latest names an older one": (lambda d: (d / "latest").write_text("iter_0000001\n"), 1, []),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(case, tiny, tmp_path):
    damage, step, notes = FALLBACKS[case]
    _two_checkpoints(tmp_path, tiny)
    damage(tmp_path)
    point = checkpoint.find_resume(tmp_path)
    assert point is not None
    assert checkpoint.read_state(point.path).step == step
    said = "; ".join(point.notes)
    assert all(note in said for note in notes), said
    assert bool(point.notes) == bool(notes)
    model, optimizer = tiny
    assert checkpoint.load(point.path, model, optimizer).step == step


def test_resume_is_none_only_without_anything_checkpoint_like(tmp_path):
    assert checkpoint.find_resume(tmp_path / "absent") is None
    assert checkpoint.find_resume(tmp_path) is None
    (tmp_path / "iter_0000001.partial").mkdir()  # a first save that never finished
    assert checkpoint.find_resume(tmp_path) is None
    (tmp_path / "latest").write_text("iter_0000001\n")
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(tmp_path))}: no complete, intact checkpoint.*does not exist"
    ):
        checkpoint.find_resume(tmp_path)


def test_resume_refuses_a_save_dir_whose_checkpoints_are_all_damaged(tiny, tmp_path):
    _two_checkpoints(tmp_path, tiny)
    _flip_byte(_largest_shard(tmp_path / "iter_0000002"))
    (tmp_path / "iter_0000001" / "manifest.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"iter_0000002.*expected.*iter_0000001 is not usable.*manifest\.json"
    ):
        checkpoint.find_resume(tmp_path)


# ----------------------------------------------------------------------------- crash safety


class _Crash(Exception):
    """The process "dies" here."""


def crashing_before(n: int, monkeypatch: Any, fn: Callable[..., Any], *args: Any) -> bool:
    """Run ``fn(*args)``, raising before the ``n``-th filesystem mutation of a checkpoint
    operation; whether it crashed."""
    real = checkpoint._fs
    count = 0

    def fs(op: Callable[..., Any], *op_args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count == n:
            raise _Crash
        return real(op, *op_args, **kwargs)

    monkeypatch.setattr(checkpoint, "_fs", fs)
    try:
        fn(*args)
    except _Crash:
        return True
    finally:
        monkeypatch.setattr(checkpoint, "_fs", real)
    return False


@pytest.mark.parametrize("step", [3, 2], ids=["new step", "newest step saved again"])
def test_a_crash_before_any_filesystem_mutation_of_a_save_loses_nothing(step, tiny, monkeypatch, tmp_path):
    """After each crash: resume finds a complete checkpoint at least as new as the last save
    that returned (step 2), it loads, and the requeued job's save then completes."""
    model, optimizer = tiny
    base = tmp_path / "base"
    _two_checkpoints(base, tiny)
    crash_points = 0
    while True:
        save_dir = tmp_path / f"crash{crash_points + 1}"
        shutil.copytree(base, save_dir)
        crashed = crashing_before(crash_points + 1, monkeypatch, _save, save_dir, step, tiny, 1)
        point = checkpoint.find_resume(save_dir)
        assert point is not None
        assert checkpoint.load(point.path, model, optimizer).step >= 2, (crash_points, point)
        assert _save(save_dir, step, tiny, keep=1) == save_dir / f"iter_{step:07d}"
        point = checkpoint.find_resume(save_dir)
        assert (point.path.name, point.notes) == (f"iter_{step:07d}", [])
        assert sorted(p.name for p in save_dir.iterdir()) == [f"iter_{step:07d}", "latest"], crash_points
        if not crashed:
            break
        crash_points += 1
    assert crash_points >= 10  # every mutation of a save, its publication and its pruning


def test_pruning_keeps_the_newest_and_the_one_latest_names(tiny, tmp_path):
    for step in (1, 2, 3, 5):
        _save(tmp_path, step, tiny, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000005"]
    _save(tmp_path, 4, tiny, keep=1)  # a run resumed from an older checkpoint
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
    assert (tmp_path / "latest").read_text() == "iter_0000004\n"


# ----------------------------------------------------------------------------- two ranks


def _two_rank_verification(save_dir: str) -> dict[str, Any]:
    """Rank body: save at DP2, resume, then damage a file that rank 1 hashes and load."""
    import torch.distributed as dist

    from megatron_prefpack.platform import distributed as platform

    platform.initialize()
    try:
        model, optimizer = _build("tiny-dense")
        saved = checkpoint.save(save_dir, _state(1, world=2), model, optimizer, keep=0)
        point = checkpoint.find_resume(save_dir)
        checkpoint.load(point.path, model, optimizer)
        files = [r["path"] for r in json.loads((saved / "manifest.json").read_text())["files"]]
        victim = saved / files[1]  # the second file: rank 1's share
        if dist.get_rank() == 0:
            _flip_byte(victim)
        dist.barrier()
        try:
            checkpoint.load(saved, model, optimizer)
            error = None
        except CheckpointError as err:
            error = str(err)
        return {"files": files, "resume": str(point.path), "error": error, "victim": str(victim)}
    finally:
        platform.destroy()


@pytest.mark.slow
def test_two_ranks_split_the_hashing_and_agree_on_the_error(tmp_path):
    ranks = run_distributed(_two_rank_verification, 2, str(tmp_path), timeout=240)
    assert ranks[0] == ranks[1]
    got = ranks[0]
    assert {"rank_state/rank00000.pt", "rank_state/rank00001.pt"} <= set(got["files"])
    assert got["resume"] == str(tmp_path / "iter_0000001")
    assert got["error"] is not None and got["error"].startswith(f"{got['victim']}: expected")


# ----------------------------------------------------------------------------- no orphans


_SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.models import presets
    from megatron_prefpack.models.config import to_transformer_config
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.model_setup import build_chunks

    if __name__ == "__main__":
        platform.initialize()
        model_cfg = presets.preset("tiny-moe")
        chunks = build_chunks(model_cfg, to_transformer_config(model_cfg))
        for step in range(1, 10**6):
            state = checkpoint.CheckpointState(step, 0, None, "sft", "", 1)
            checkpoint.save(sys.argv[1], state, chunks, None, keep=2)
    """
)


def _saved_step(save_dir: Path) -> int:
    try:
        return int((save_dir / "latest").read_text().strip()[len("iter_") :])
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_save_leaves_no_process_behind(tmp_path):
    """The trainer saves in a loop (a save is nearly all of its time); every process it has
    in half a second is recorded, then it gets SIGKILL: none of them may live on."""
    import psutil

    script, save_dir = tmp_path / "save_forever.py", tmp_path / "save"
    script.write_text(_SAVE_FOREVER)
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    trainer = subprocess.Popen(
        [sys.executable, str(script), str(save_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 120
        while _saved_step(save_dir) < 3:
            assert trainer.poll() is None and time.monotonic() < deadline, "the trainer never saved"
            time.sleep(0.05)
        watch_until = time.monotonic() + 0.5
        while time.monotonic() < watch_until:
            seen.update((p.pid, p) for p in psutil.Process(trainer.pid).children(recursive=True))
            time.sleep(0.01)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=30)
        time.sleep(2.0)
        survivors = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert survivors == [], [p.cmdline() for p in survivors]
    finally:
        trainer.kill()
        for proc in seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
    point = checkpoint.find_resume(save_dir)
    assert point is not None and checkpoint.read_state(point.path).step >= 3
