"""``prefpack train`` end to end on a tiny synthetic dataset (CPU, gloo).

- every parallel layout follows the single-process loss trajectory (DPO; a reward model at TP2
  and CP2);
- a reward model starts from a language-model checkpoint and its own checkpoints keep the head;
- resuming from a checkpoint reproduces the uninterrupted run exactly;
- SIGTERM finishes the step, saves a loadable checkpoint and exits 0;
- the same global batch of groups gives the same loss and gradients in the preference-packed,
  duplicated and unpacked layouts;
- ``prefpack ref-logprobs`` writes what the online reference computes.
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

from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

VOCAB = 96  # the tiny presets' vocabulary


def make_dataset(directory: Path, num_groups: int = 40, seed: int = 0) -> Path:
    """Random pairs: prompts of 2-10 tokens, responses of 2-8 (EOS = 2 last), scores [1, 0]."""
    from megatron_prefpack.data.group_dataset import GroupDatasetWriter
    from megatron_prefpack.data.groups import TokenizedGroup

    rng = np.random.default_rng(seed)
    with GroupDatasetWriter(directory, VOCAB) as writer:
        for i in range(num_groups):
            prompt = rng.integers(4, VOCAB, rng.integers(2, 11)).astype(np.int32)
            responses = [
                np.append(rng.integers(4, VOCAB, rng.integers(1, 8)), 2).astype(np.int32) for _ in range(2)
            ]
            writer.add(TokenizedGroup(i, prompt, responses, "pair", [1.0, 0.0]), line=i + 1)
        writer.finalize({"tokenizer": {"pad_id": 0}})
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data}",
        f"run.dir={run_dir}",
        "run.tensorboard=false",
        "run.log_interval=100",
        "data.seq_len=64",
        "data.micro_batch_size=2",
        "data.global_batch_size=4",
        "model.preset=tiny-moe",
        "objective.type=dpo",
        "objective.dpo.beta=0.5",
        "reference.mode=online",
        "optimizer.lr=1e-2",
        "optimizer.decay_style=constant",
        "optimizer.min_lr=1e-2",
        "run.train_steps=3",
        *extra,
    ]


def _train(args: list[str]) -> dict:
    """Rank body: train, return the per-step losses and grad norms plus the final checkpoint."""
    from megatron_prefpack.training.config import load_config
    from megatron_prefpack.training.train import train

    result = train(load_config(None, args))
    return {
        "loss": [h["loss"] for h in result.history],
        "grad_norm": [h["grad_norm"] for h in result.history],
        "checkpoint": str(result.checkpoint),
        "evals": result.evals,
    }


def train_ranks(world: int, args: list[str]) -> dict:
    return run_distributed(_train, world, args, timeout=240)[0]


def _save_initial_weights(args: list[str], path: str) -> None:
    """Rank body: build the model of ``args`` and save its initial weights as a checkpoint."""
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import load_config, model_config, to_yaml
    from megatron_prefpack.training.model_setup import build_chunks, init_distributed, transformer_config

    cfg = load_config(None, args)
    init_distributed(cfg)
    try:
        model_cfg = model_config(cfg)
        chunks = build_chunks(model_cfg, transformer_config(cfg, model_cfg))
        state = checkpoint.CheckpointState(0, 0, None, cfg.objective.type, to_yaml(cfg), 1)
        checkpoint.save(path, state, chunks, None, keep=0)
    finally:
        platform.destroy()


SFT = ["objective.type=sft", "reference.mode=none"]

LAYOUTS = {
    "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "ep2": (2, ["parallel.expert=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2_ep2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"]),
    "dp2_distributed_optimizer": (2, ["parallel.distributed_optimizer=true"]),
    "cp2": (2, ["parallel.context=2"]),
    "tp2_cp2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.context=2"]),
}


@pytest.fixture(scope="module")
def initial_weights(dataset, tmp_path_factory) -> list[str]:
    """Every layout starts from the same weights: a checkpoint saved by one process and
    loaded (resharded by dist_checkpointing) into each layout. Expert weights, for one, are
    initialised per expert-parallel rank, so fresh inits differ between EP layouts."""
    path = tmp_path_factory.mktemp("init") / "ckpt"
    run_distributed(_save_initial_weights, 1, overrides(dataset, path.parent / "run"), str(path), timeout=120)
    return [f"checkpoint.load={path}", "checkpoint.load_optimizer=false"]


@pytest.fixture(scope="module")
def single_process_run(dataset, initial_weights, tmp_path_factory) -> dict:
    return train_ranks(1, overrides(dataset, tmp_path_factory.mktemp("single"), *initial_weights))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_follow_single_process(
    layout, dataset, initial_weights, single_process_run, tmp_path
):
    world, extra = LAYOUTS[layout]
    got = train_ranks(world, overrides(dataset, tmp_path, *initial_weights, *extra))
    np.testing.assert_allclose(got["loss"], single_process_run["loss"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], single_process_run["grad_norm"], rtol=2e-3)
    # Learning, not just running: the DPO loss drops from log(2) on this data.
    assert single_process_run["loss"][0] == pytest.approx(np.log(2), abs=1e-6)
    assert single_process_run["loss"][-1] < single_process_run["loss"][0]


RM = ["objective.type=rm", "reference.mode=none"]


@pytest.fixture(scope="module")
def rm_single_process_run(dataset, initial_weights, tmp_path_factory) -> dict:
    return train_ranks(1, overrides(dataset, tmp_path_factory.mktemp("rm-single"), *initial_weights, *RM))


@pytest.mark.parametrize("layout", ["tp2_sp", "cp2"])
def test_reward_model_under_model_parallel_follows_single_process(
    layout, dataset, initial_weights, rm_single_process_run, tmp_path
):
    """A reward model started from a language-model checkpoint (fresh head, same on every
    rank) trains the same at TP2 + SP and at CP2 (each response's reward read on the CP rank
    that holds its EOS token) as on one process."""
    single = rm_single_process_run
    world, extra = LAYOUTS[layout]
    got = train_ranks(world, overrides(dataset, tmp_path, *initial_weights, *RM, *extra))
    np.testing.assert_allclose(got["loss"], single["loss"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], single["grad_norm"], rtol=2e-3)
    assert single["loss"][-1] < single["loss"][0]


def test_reward_model_checkpoint_keeps_its_head(dataset, initial_weights, tmp_path):
    """LM checkpoint -> RM (fresh head) -> RM checkpoint -> a new RM run from it: the new run's
    step-0 held-out loss is the saved model's final one, so body and head both came back."""
    held_out = ["data.eval_fraction=0.2", "run.eval_interval=3"]
    first = train_ranks(1, overrides(dataset, tmp_path / "a", *initial_weights, *RM, *held_out))
    assert [e["step"] for e in first["evals"]] == [0, 3]
    again = train_ranks(
        1,
        overrides(
            dataset,
            tmp_path / "b",
            *RM,
            *held_out,
            f"checkpoint.load={first['checkpoint']}",
            "checkpoint.load_optimizer=false",
            "run.train_steps=1",
        ),
    )
    assert again["evals"][0]["step"] == 0
    assert again["evals"][0]["loss"] == pytest.approx(first["evals"][-1]["loss"], rel=1e-6)
    assert again["evals"][0]["loss"] != pytest.approx(first["evals"][0]["loss"], rel=1e-3)


@pytest.mark.parametrize(
    ("world", "optimizer"),
    [(1, "parallel.distributed_optimizer=false"), (2, "parallel.distributed_optimizer=true")],
    ids=["adam", "dp2_distributed_adam"],
)
def test_resume_reproduces_the_uninterrupted_run(world, optimizer, dataset, tmp_path):
    sft = [*SFT, "run.train_steps=6", optimizer]
    straight = train_ranks(world, overrides(dataset, tmp_path / "a", *sft, "checkpoint.interval=3"))
    middle = tmp_path / "a" / "checkpoints" / "iter_0000003"
    assert (middle / "prefpack.json").is_file()
    resumed = train_ranks(world, overrides(dataset, tmp_path / "b", *sft, f"checkpoint.load={middle}"))
    assert len(resumed["loss"]) == 3
    np.testing.assert_array_equal(resumed["loss"], straight["loss"][3:])
    np.testing.assert_array_equal(resumed["grad_norm"], straight["grad_norm"][3:])


@pytest.mark.parametrize(
    "load_optimizer", [False, True], ids=["weights_only_load", "weights_only_checkpoint"]
)
def test_resubmitted_job_continues_from_its_save_dir(load_optimizer, dataset, initial_weights, tmp_path):
    """Slurm requeue: the same command again resumes from the newest checkpoint in the save
    dir, not from ``checkpoint.load``; the online reference is reloaded from the weights the
    run started from (also when ``checkpoint.load`` is a weights-only checkpoint that
    ``load_optimizer: true`` starts from, as it does a ``prefpack merge`` output)."""
    initial_weights = [*initial_weights[:1], f"checkpoint.load_optimizer={str(load_optimizer).lower()}"]
    straight = train_ranks(1, overrides(dataset, tmp_path / "a", *initial_weights, "run.train_steps=6"))
    first = train_ranks(1, overrides(dataset, tmp_path / "b", *initial_weights, "run.train_steps=3"))
    again = train_ranks(1, overrides(dataset, tmp_path / "b", *initial_weights, "run.train_steps=6"))
    np.testing.assert_array_equal(first["loss"] + again["loss"], straight["loss"])
    fresh = train_ranks(
        1,
        overrides(
            dataset, tmp_path / "b", *initial_weights, "run.train_steps=2", "checkpoint.auto_resume=false"
        ),
    )
    np.testing.assert_array_equal(fresh["loss"], straight["loss"][:2])


def test_sigterm_saves_a_loadable_checkpoint_and_exits_zero(dataset, tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "long.yaml"
    config.write_text("# everything comes from the command line\n")
    args = [
        sys.executable,
        "-m",
        "megatron_prefpack.cli",
        "train",
        "--config",
        str(config),
        *overrides(dataset, run_dir, *SFT, "run.train_steps=100000", "run.log_interval=1"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for line in metrics.open() if '"train"' in line) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output
    from megatron_prefpack.training.checkpoint import read_state

    state = read_state(run_dir / "checkpoints")
    steps = [json.loads(line)["step"] for line in metrics.open() if '"train"' in line]
    assert state.step == steps[-1] >= 2
    assert state.consumed_rows == 4 * state.step
    # Loadable: the same command, resubmitted, continues for one more step.
    more = train_ranks(1, overrides(dataset, run_dir, *SFT, f"run.train_steps={state.step + 1}"))
    assert len(more["loss"]) == 1


def _all_rows(dataset: Path, layout: str) -> int:
    from megatron_prefpack.data.group_dataset import GroupDataset
    from megatron_prefpack.data.packing import GroupLengths, PackingConfig, pack

    lengths = GroupDataset(dataset).token_lengths()
    ids = np.arange(len(lengths.prompt))
    plan = pack(
        GroupLengths(lengths.prompt, lengths.response, lengths.response_offsets, ids),
        PackingConfig(seq_len=64, layout=layout, seed=1234),
    )
    return plan.num_rows


@pytest.mark.parametrize("layout", ["duplicated", "unpacked"])
def test_packed_and_baseline_layouts_give_the_same_loss_and_gradients(layout, tmp_path):
    """One global batch = the whole (small) dataset, so every layout sees the same groups."""
    data = make_dataset(tmp_path / "ds", num_groups=8, seed=1)
    runs = {}
    for name in ("prefpack", layout):
        rows = _all_rows(data, name)
        runs[name] = train_ranks(
            1,
            overrides(
                data,
                tmp_path / name,
                f"data.layout={name}",
                f"data.micro_batch_size={rows}",
                f"data.global_batch_size={rows}",
                "run.train_steps=2",
                "model.moe.aux_loss_coeff=0.0",  # the aux loss depends on which tokens share a batch
            ),
        )
    np.testing.assert_allclose(runs[layout]["loss"], runs["prefpack"]["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs[layout]["grad_norm"], runs["prefpack"]["grad_norm"], rtol=1e-4)


def _write_reference(args: list[str], load: str, output: str) -> None:
    from megatron_prefpack.training.config import load_config
    from megatron_prefpack.training.ref_logprobs import write_reference_logprobs

    write_reference_logprobs(load_config(None, args, check_reference=False), load, Path(output))


def _ref_logprobs_cli(argv: list[str]) -> int:
    from megatron_prefpack import cli

    return cli.main(argv)


def test_ref_logprobs_load_flag_needs_no_checkpoint_load_of_the_config(dataset, initial_weights, tmp_path):
    """``--load`` names the checkpoint to read: a config whose own ``checkpoint.load`` does not
    exist (yet: it names a later stage's input) still works."""
    load = initial_weights[0].split("=", 1)[1]
    table = tmp_path / "ref.npy"
    config = tmp_path / "dpo.yaml"
    config.write_text("objective:\n  type: dpo\n")
    argv = ["ref-logprobs", "--config", str(config), "--load", load, "--output", str(table)]
    argv += [*overrides(dataset, tmp_path / "r"), f"checkpoint.load={tmp_path / 'not-yet'}"]
    assert run_distributed(_ref_logprobs_cli, 1, argv) == [0]
    header = json.loads((tmp_path / "ref.npy.json").read_text())
    assert header["checkpoint"]["path"] == str(Path(load, "iter_0000000").resolve())


def test_offline_reference_file_matches_the_online_reference(dataset, initial_weights, tmp_path):
    load = initial_weights[0].split("=", 1)[1]
    table = tmp_path / "ref.npy"
    run_distributed(
        _write_reference, 2, overrides(dataset, tmp_path / "r", "parallel.expert=2"), load, str(table)
    )
    header = json.loads((tmp_path / "ref.npy.json").read_text())
    assert header["num_groups"] == 40
    assert header["checkpoint"]["path"] == str(Path(load, "iter_0000000").resolve())
    assert header["checkpoint"]["step"] == 0 and len(header["checkpoint"]["manifest_sha256"]) == 64
    assert not np.isnan(np.load(table)).any()
    offline = train_ranks(
        1,
        overrides(
            dataset, tmp_path / "off", *initial_weights, "reference.mode=offline", f"reference.path={table}"
        ),
    )
    online = train_ranks(1, overrides(dataset, tmp_path / "on", *initial_weights, f"reference.load={load}"))
    np.testing.assert_allclose(offline["loss"], online["loss"], rtol=1e-5, atol=1e-6)
