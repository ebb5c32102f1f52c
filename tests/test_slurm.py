"""slurm/train.sbatch, run with stand-in ``srun``/``scontrol``: what it launches, and with what."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "slurm" / "train.sbatch"


def _run(tmp_path: Path, args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "srun.log"
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text(
        f'#!/bin/sh\necho "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" > {log}\necho "$@" >> {log}\n'
    )
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        **env,
    }
    done = subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True)
    return done, log.read_text() if log.is_file() else ""


def test_launches_train_on_every_task_with_the_first_node_as_master(tmp_path):
    done, log = _run(tmp_path, ["cfg.yaml", "optimizer.lr=1e-6"])
    assert done.returncode == 0, done.stderr
    env_line, command = log.splitlines()
    assert env_line == "MASTER_ADDR=gpu-node-07 MASTER_PORT=24242"
    assert command.endswith("python -m megatron_prefpack.cli train --config cfg.yaml optimizer.lr=1e-6")
    assert "--kill-on-bad-exit=1" in command


def test_reference_logprobs_and_container(tmp_path):
    done, log = _run(
        tmp_path,
        ["cfg.yaml", "--output", "ref.npy"],
        PREFPACK_COMMAND="ref-logprobs",
        CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.10-py3",
    )
    assert done.returncode == 0, done.stderr
    command = log.splitlines()[1]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.10-py3" in command
    assert command.endswith("-m megatron_prefpack.cli ref-logprobs --config cfg.yaml --output ref.npy")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "usage: sbatch slurm/train.sbatch CONFIG.yaml"),
        (["cfg.yaml"], {"PREFPACK_COMMAND": "preprocess"}, "PREFPACK_COMMAND must be train or ref-logprobs"),
    ],
)
def test_bad_invocations_exit_2_before_launching(tmp_path, args, env, message):
    done, log = _run(tmp_path, args, **env)
    assert done.returncode == 2
    assert message in done.stderr
    assert log == ""
