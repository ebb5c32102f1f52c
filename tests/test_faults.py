"""Fault injection for ``prefpack train``: every ordinary fault of a long run ends in the
uninterrupted run's state (bit for bit) or in a clear error, never silently wrong.

Covered here end to end (tiny MoE, CPU, at most 2 processes); the checkpoint module's own
crash points, planted pickles and corrupted shards are in ``tests/test_checkpoint.py``:

- NaN/inf: a poisoned step applies no update and does not advance the schedule; too many in
  a row stop the run (exit 3) without saving; a NaN learning rate is refused before any work;
- SIGTERM at start-up, in the first evaluation, in a save and in the final evaluation: a saved
  checkpoint, exit 0, and a resumed run that reaches the uninterrupted run's losses;
- resume: a garbage ``latest`` or a newest checkpoint without ``prefpack.json`` falls back to
  the newest complete one (said in the log); a corrupted shard or planted pickle stops with
  exit 2 naming the file; a changed data/model/parallel config is refused, a changed lr applied;
- inputs that must agree: model vocabulary vs tokenizer, the reference table's dataset,
  preferences for DPO;
- a stalled peer ends the job after ``run.timeout_minutes``; a second run in the same
  directory stops at once; a stale lock is taken over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import free_port, run_distributed
from tests.test_train import SFT, VOCAB, make_dataset, overrides

pytestmark = pytest.mark.slow

SFT_EVAL = [*SFT, "data.eval_fraction=0.2"]
STEPS5 = [*SFT_EVAL, "run.train_steps=5"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


def _train(args: list[str]) -> dict:
    from megatron_prefpack.training.config import load_config
    from megatron_prefpack.training.train import train

    result = train(load_config(None, args))
    return {
        "loss": _losses(result),
        "lr": [h["lr"] for h in result.history],
        "steps": result.steps,
        "preempted": result.preempted,
        "checkpoint": str(result.checkpoint),
        "nonfinite": result.nonfinite_steps,
    }


def train1(args: list[str]) -> dict:
    return run_distributed(_train, 1, args, timeout=240)[0]


COMMAND = [sys.executable, "-m", "megatron_prefpack.cli", "train", "--config", os.devnull]
"""``prefpack train`` with every key on the command line (an empty config file)."""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``prefpack train`` as a user runs it, one process."""
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory) -> dict:
    """The uninterrupted 5-step SFT run (with a held-out split) that interrupted ones must reproduce."""
    return train1(overrides(dataset, tmp_path_factory.mktemp("straight"), *STEPS5))


# ----------------------------------------------------------------------------- non-finite steps


def _train_with_poisoned_steps(args: list[str], poisoned: list[int]) -> dict:
    """Rank body: fill the gradient buffers with NaN after the backward of the given steps
    (1-based) and record a digest of the weights after every step."""
    import torch

    from megatron_prefpack.training import step as step_module

    real_schedule, real_step = step_module.run_schedule, step_module.train_step
    calls = {"backward": 0}
    digests: list[float] = []

    def run_schedule(model_chunks, items, forward_step, forward_only):
        out = real_schedule(model_chunks, items, forward_step, forward_only)
        if not forward_only:
            calls["backward"] += 1
            if calls["backward"] in poisoned:
                for chunk in model_chunks:
                    for buffer in chunk.buffers:
                        buffer.grad_data.fill_(float("nan"))
        return out

    def train_step(model_chunks, *rest):
        out = real_step(model_chunks, *rest)
        params = [p.detach().double().sum() for c in model_chunks for p in c.parameters()]
        digests.append(float(torch.stack(params).sum()))
        return out

    step_module.run_schedule, step_module.train_step = run_schedule, train_step
    try:
        return {**_train(args), "digests": digests}
    except Exception as err:  # the divergence stop: report it as data
        return {"error": f"{type(err).__name__}: {err}", "digests": digests}


def test_a_nonfinite_step_applies_no_update_and_is_counted(dataset, tmp_path):
    got = run_distributed(
        _train_with_poisoned_steps,
        1,
        overrides(dataset, tmp_path, *STEPS5, "optimizer.warmup_steps=3"),
        [2],
        timeout=240,
    )[0]
    assert got["nonfinite"] == 1
    assert got["digests"][1] == got["digests"][0]  # step 2 changed no weight
    assert got["digests"][2] != got["digests"][1]  # step 3 trained again
    # the skipped step did not advance the warmup (lr logged after each step's schedule step):
    # step 3 gets the lr step 2 would have had
    assert got["lr"][:3] == pytest.approx([1e-2 / 3, 1e-2 / 3, 2e-2 / 3])
    assert np.isfinite(got["loss"][2:]).all()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    train_lines = [m for m in metrics if m["split"] == "train"]
    assert [m["nonfinite_steps"] for m in train_lines] == [0, 1, 1, 1, 1]


def test_too_many_nonfinite_steps_in_a_row_stop_without_saving(dataset, tmp_path):
    args = overrides(dataset, tmp_path, *STEPS5, "checkpoint.interval=1", "run.max_nonfinite_steps=2")
    got = run_distributed(_train_with_poisoned_steps, 1, args, [2, 3], timeout=240)[0]
    assert got["error"].startswith("TrainingDiverged: step 3: 2 steps in a row")
    assert "Last saved step: 1" in got["error"]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert saved == ["iter_0000001"]


def test_nonfinite_learning_rate_is_refused_before_any_work(dataset, tmp_path):
    out = cli(overrides(dataset, tmp_path / "run", *SFT, "optimizer.lr=.nan"))
    assert out.returncode == 2, out.stderr
    assert "override 'optimizer.lr=.nan'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_diverging_run_exits_3_and_keeps_its_last_good_checkpoint(dataset, tmp_path):
    """The reported case: a huge lr gives NaN after a few steps; the run used to go on,
    save NaN checkpoints and prune the last finite one."""
    out = cli(
        overrides(
            dataset,
            tmp_path / "run",
            *SFT,
            "optimizer.lr=1e30",
            "optimizer.min_lr=1e30",
            "run.train_steps=20",
            "checkpoint.interval=1",
            "checkpoint.keep=1",
        )
    )
    assert out.returncode == 3, out.stdout + out.stderr
    assert "steps in a row had a non-finite loss or gradient" in out.stderr
    from megatron_prefpack.training.checkpoint import read_state

    state = read_state(tmp_path / "run" / "checkpoints")
    assert state.step >= 1  # the newest finite checkpoint survives


# ----------------------------------------------------------------------------- SIGTERM


def _train_with_sigterm(args: list[str], phase: str) -> dict:
    """Rank body: send this process SIGTERM in ``phase``: 'startup' (data loading), 'first_eval',
    'save' (inside the first periodic save) or 'final_eval'."""
    from megatron_prefpack.training import checkpoint, data, step

    def term() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    if phase == "startup":
        real_build = data.build_data

        def build_data(*a, **k):
            term()
            return real_build(*a, **k)

        data.build_data = build_data
    elif phase in ("first_eval", "final_eval"):
        real_eval, seen = step.evaluate, {"n": 0}

        def evaluate(*a, **k):
            seen["n"] += 1
            if (phase == "first_eval") == (seen["n"] == 1):
                term()
            return real_eval(*a, **k)

        step.evaluate = evaluate
    elif phase == "save":
        real_save = checkpoint.save

        def save(*a, **k):
            term()
            return real_save(*a, **k)

        checkpoint.save = save
    return _train(args)


@pytest.mark.parametrize(
    ("phase", "stop_step"), [("startup", 0), ("first_eval", 0), ("save", 2), ("final_eval", 3)]
)
def test_sigterm_in_any_phase_saves_and_the_resumed_run_is_exact(
    phase, stop_step, dataset, straight, tmp_path
):
    base = overrides(dataset, tmp_path, *SFT_EVAL, "checkpoint.interval=2")
    got = run_distributed(_train_with_sigterm, 1, [*base, "run.train_steps=3"], phase, timeout=240)[0]
    assert got["preempted"] and got["steps"] == stop_step
    from megatron_prefpack.training.checkpoint import read_state

    if stop_step == 0:  # nothing trained yet, nothing to keep: a rerun starts over, same as before
        assert got["checkpoint"] == "None" and not list((tmp_path / "checkpoints").glob("iter_*"))
    else:
        assert read_state(tmp_path / "checkpoints").step == stop_step
    resumed = train1([*base, "run.train_steps=5"])
    np.testing.assert_array_equal(resumed["loss"], straight["loss"][stop_step:])


# ----------------------------------------------------------------------------- resume


def test_garbage_latest_falls_back_to_the_newest_complete_checkpoint(dataset, straight, tmp_path):
    base = overrides(dataset, tmp_path, *SFT_EVAL, "checkpoint.interval=1", "checkpoint.keep=0")
    train1([*base, "run.train_steps=3"])
    ckpts = tmp_path / "checkpoints"
    (ckpts / "latest").write_text("not a checkpoint\n")
    (ckpts / "iter_0000003" / "prefpack.json").unlink()  # and the newest is incomplete
    out = cli([*base, "run.train_steps=5"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "iter_0000002" in out.stdout and "resumed from" in out.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").open() if '"train"' in line]
    np.testing.assert_array_equal(losses[-3:], straight["loss"][2:])


def test_nothing_loadable_in_the_save_dir_stops_instead_of_starting_over(dataset, tmp_path):
    base = overrides(dataset, tmp_path, *SFT, "run.train_steps=2")
    train1(base)
    (tmp_path / "checkpoints" / "iter_0000002" / "prefpack.json").unlink()
    out = cli(base)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "checkpoints" in out.stderr


def test_a_corrupted_shard_is_named_and_not_loaded(dataset, tmp_path):
    base = overrides(dataset, tmp_path, *SFT, "run.train_steps=2")
    train1(base)
    shard = next((tmp_path / "checkpoints" / "iter_0000002").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = cli([*base[:-1], "run.train_steps=3"])
    assert out.returncode == 2, out.stdout + out.stderr
    assert shard.name in out.stderr


def test_a_planted_pickle_never_runs_on_resume(dataset, tmp_path):
    base = overrides(dataset, tmp_path, *SFT, "run.train_steps=2")
    train1(base)
    marker = tmp_path / "pwned"
    payload = (
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )  # pickle protocol 0: os.system("touch ...")
    targets = list((tmp_path / "checkpoints" / "iter_0000002").rglob("rank*.pt"))
    assert targets
    for target in targets:
        target.write_bytes(payload)
    out = cli([*base[:-1], "run.train_steps=3"])
    assert not marker.exists()
    assert out.returncode == 2, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ("data.seq_len=128", "data.seq_len"),
        ("model.num_layers=3", "model.num_layers"),
        ("run.seed=7", "run.seed"),
    ],
)
def test_resume_refuses_a_changed_data_or_model_config(change, refused, dataset, tmp_path):
    base = overrides(dataset, tmp_path, *SFT, "run.train_steps=1")
    train1(base)
    out = cli([*base[:-1], "run.train_steps=2", change])
    assert out.returncode == 2, out.stdout + out.stderr
    assert "resuming" in out.stderr and refused in out.stderr


def test_resume_applies_and_announces_a_changed_learning_rate(dataset, tmp_path):
    base = overrides(dataset, tmp_path, *SFT, "run.train_steps=1")
    train1(base)
    out = cli([*base[:-1], "run.train_steps=2", "optimizer.lr=5e-3", "optimizer.min_lr=5e-3"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "optimizer.lr: 0.01 -> 0.005" in out.stdout
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"train"' in line][-1]
    assert last["step"] == 2 and last["lr"] == pytest.approx(5e-3)


# ----------------------------------------------------------------------------- inputs that must agree


def test_model_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    data = make_dataset(tmp_path / "ds", num_groups=12)
    info = json.loads((data / "dataset.json").read_text())
    info["tokenizer"]["vocab_size"] = VOCAB + 10
    (data / "dataset.json").write_text(json.dumps(info))
    out = cli(overrides(data, tmp_path / "run", *SFT))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"model.vocab_size: {VOCAB} is smaller than" in out.stderr and str(VOCAB + 10) in out.stderr


def _write_reference(args: list[str], output: str) -> None:
    from megatron_prefpack.training.config import load_config
    from megatron_prefpack.training.ref_logprobs import write_reference_logprobs

    write_reference_logprobs(load_config(None, args, check_reference=False), None, Path(output))


def test_a_reference_table_of_other_data_is_refused(dataset, tmp_path):
    other = make_dataset(tmp_path / "other", num_groups=40, seed=5)  # same size, other tokens
    table = tmp_path / "ref.npy"
    run_distributed(_write_reference, 1, overrides(other, tmp_path / "r"), str(table), timeout=120)
    out = cli(overrides(dataset, tmp_path / "run", "reference.mode=offline", f"reference.path={table}"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "ref.npy: computed on dataset" in out.stderr and "recompute" in out.stderr


def _ranked_dataset(directory: Path, kind: str, scores: list[float] | None) -> Path:
    from megatron_prefpack.data.group_dataset import GroupDatasetWriter
    from megatron_prefpack.data.groups import TokenizedGroup

    rng = np.random.default_rng(0)
    with GroupDatasetWriter(directory, VOCAB) as writer:
        for i in range(12):
            prompt = rng.integers(4, VOCAB, 5).astype(np.int32)
            responses = [np.append(rng.integers(4, VOCAB, 3), 2).astype(np.int32) for _ in range(2)]
            group_scores = scores if i == 7 else ([1.0, 0.0] if kind == "ranked" else None)
            writer.add(TokenizedGroup(i, prompt, responses, kind, group_scores), line=i + 1)
        writer.finalize({"tokenizer": {"pad_id": 0}})
    return directory


@pytest.mark.parametrize(
    ("kind", "scores"), [("multi", None), ("ranked", [0.0, 1.0]), ("ranked", [1.0, 1.0])]
)
def test_dpo_refuses_groups_without_a_preference(kind, scores, tmp_path):
    data = _ranked_dataset(tmp_path / "ds", kind, scores)
    out = cli(overrides(data, tmp_path / "run"))
    assert out.returncode == 2, out.stdout + out.stderr
    expected = "12 of 12 groups" if kind == "multi" else "1 of 12 groups"
    assert expected in out.stderr and "source lines [" in out.stderr


# ----------------------------------------------------------------------------- distributed faults


def test_a_stalled_peer_ends_the_job_after_the_timeout(dataset, tmp_path):
    port = str(free_port())
    args = overrides(dataset, tmp_path, *SFT, "run.train_steps=100000", "run.timeout_minutes=0.1")
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [*COMMAND, *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.is_file() and '"train"' in metrics.read_text()):
            assert ranks[0].poll() is None, ranks[0].communicate()[0]
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        output, _ = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode != 0, output
        assert time.monotonic() - stopped < 90
        assert "run.timeout_minutes=0.1" in output, output
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()


def test_a_second_run_in_the_same_directory_stops_at_once(dataset, tmp_path):
    from megatron_prefpack.training.run_lock import LOCK_NAME, RunLock

    with RunLock([tmp_path]):  # a live run (this very test process) holds the run dir
        out = cli(overrides(dataset, tmp_path, *SFT))
    assert out.returncode == 2, out.stdout + out.stderr
    assert LOCK_NAME in out.stderr and "another run is using this directory" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_stale_lock_is_taken_over_and_said(dataset, tmp_path):
    import socket

    from megatron_prefpack.training.run_lock import LOCK_NAME

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    out = cli(overrides(dataset, tmp_path, *SFT, "run.train_steps=1"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"its process {dead.pid}" in out.stdout
    assert not (tmp_path / LOCK_NAME).exists()


def test_run_lock_heartbeat_age_makes_a_foreign_lock_stale():
    from megatron_prefpack.training.run_lock import stale_reason

    foreign = {"host": "some-other-node", "pid": 1, "slurm_job_id": "1"}
    assert stale_reason(foreign, age_s=10, stale_after_s=300) is None
    assert "no heartbeat" in stale_reason(foreign, age_s=301, stale_after_s=300)
