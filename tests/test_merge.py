"""``prefpack merge`` (``training/merge_checkpoints.py``): weighted linear merges of checkpoints
(CPU, gloo, tiny MoE).

The reference is independent of the merge's sharded path: each input and the output are loaded
in one process (TP1, Megatron resharding from whatever layout wrote them) into plain torch
state dicts, and the weighted sum is computed there, in fp32 in input order, rounded once.

- Think-Fusion as the demo runs it: two ``prefpack train`` SFT save dirs merged 0.8/0.2 by the
  CLI in one process; ``prefpack train`` starts from the output (weights only); every tensor is
  the weighted sum exactly; ``merge.json`` records inputs and weights;
- inputs saved under TP2+SP, EP2 and PP2, merged under TP2+SP (two ranks): every tensor exact;
- weights (1, 0), merged under EP2: input A bit for bit;
- reward models merge with their heads;
- bad input exits 2 naming the cause: a missing input, one input, a weight count or sum that
  does not fit, a non-finite weight, another architecture (the key named), a LoRA input, a
  reward model with a language model, an override outside ``parallel.*``, a non-empty output,
  a layout that does not fit the world size.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from megatron_prefpack.cli import main as prefpack
from tests.distributed import run_distributed
from tests.test_train import make_dataset, overrides, train_ranks

pytestmark = pytest.mark.slow

SFT = ["objective.type=sft", "reference.mode=none"]
RM = ["objective.type=rm", "reference.mode=none"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


# ----------------------------------------------------------------------------- rank bodies


def _save_model(args: list[str], path: str) -> None:
    """Rank body: build ``args``'s model under its layout (its own seed) and save it."""
    import torch.distributed as dist

    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import check_parallel_layout, load_config, model_config, to_yaml
    from megatron_prefpack.training.model_setup import build_chunks, init_distributed, transformer_config

    cfg = load_config(None, args)
    init_distributed(cfg)
    try:
        model_cfg = model_config(cfg)
        check_parallel_layout(cfg, dist.get_world_size(), model_cfg)
        rm = cfg.objective.type == "rm"
        chunks = build_chunks(
            model_cfg,
            transformer_config(cfg, model_cfg),
            reward_head=rm,
            head_init_std=cfg.objective.rm.head_init_std,
        )
        state = checkpoint.CheckpointState(
            3, 12, None, cfg.objective.type, to_yaml(cfg), dist.get_world_size()
        )
        checkpoint.save(path, state, chunks, None, keep=0)
    finally:
        platform.destroy()


def _full_states(paths: list[str]) -> list[dict[str, torch.Tensor]]:
    """Rank body (one process): every checkpoint of ``paths`` loaded into a TP1 model built from
    its own stored config; its floating-point state-dict tensors."""
    import dataclasses

    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import ParallelConfig, config_from_yaml, model_config
    from megatron_prefpack.training.model_setup import build_chunks, transformer_config

    platform.initialize()
    states = []
    try:
        for path in paths:
            saved = checkpoint.read_state(path)
            cfg = config_from_yaml(saved.config_yaml, path)
            cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
            model_cfg = model_config(cfg)
            (chunk,) = build_chunks(
                model_cfg, transformer_config(cfg, model_cfg), reward_head=saved.objective == "rm"
            )
            checkpoint.load(path, [chunk], restore_rng=False)
            states.append(
                {
                    name: value.detach().clone()
                    for name, value in chunk.state_dict().items()
                    if isinstance(value, torch.Tensor) and value.is_floating_point()
                }
            )
    finally:
        platform.destroy()
    return states


def _merge(inputs: list[str], weights: list[float], output: str, layout: list[str]) -> str:
    from megatron_prefpack.training.merge_checkpoints import merge_checkpoints

    return str(merge_checkpoints(inputs, weights, Path(output), overrides=layout))


def _cli(argv: list[str]) -> int:
    return prefpack(argv)


# ----------------------------------------------------------------------------- helpers


def full_states(*paths: Path | str) -> list[dict[str, torch.Tensor]]:
    return run_distributed(_full_states, 1, [str(p) for p in paths], timeout=180)[0]


def weighted_sum(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The merge of full state dicts: fp32, in input order, rounded to each tensor's dtype once."""
    assert all(s.keys() == states[0].keys() for s in states)
    return {
        name: functools.reduce(
            lambda acc, term: acc + term, (s[name].float() * w for s, w in zip(states, weights, strict=True))
        ).to(states[0][name].dtype)
        for name in states[0]
    }


def assert_exactly(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def save(dataset: Path, path: Path, world: int, *extra: str) -> Path:
    run_distributed(
        _save_model, world, overrides(dataset, path.parent / "run", *extra), str(path), timeout=180
    )
    return path


def cli_error(capsys, *argv: str) -> str:
    """Run ``prefpack merge ARGV`` in this process; it must exit 2; its stderr."""
    assert prefpack(["merge", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefpack merge: ")
    return err


# ----------------------------------------------------------------------------- Think-Fusion


def test_think_fusion_merge_of_two_train_runs_then_train_from_it(dataset, tmp_path):
    runs = {}
    for name, seed in (("think", 1), ("plain", 2)):
        run_dir = tmp_path / name
        train_ranks(1, overrides(dataset, run_dir, *SFT, "run.train_steps=1", f"run.seed={seed}"))
        runs[name] = run_dir / "checkpoints"
    merged = tmp_path / "fused"
    argv = ["merge", "--input", str(runs["think"]), "--input", str(runs["plain"])]
    argv += ["--weights", "0.8", "0.2", "--output", str(merged)]
    assert run_distributed(_cli, 1, argv, timeout=180) == [0]

    from megatron_prefpack.training import checkpoint

    state = checkpoint.read_state(merged)
    assert (state.step, state.objective, state.scheduler, state.base) == (0, "sft", None, None)
    record = json.loads((merged / "merge.json").read_text())
    assert [i["weight"] for i in record["inputs"]] == [0.8, 0.2]
    assert [i["path"] for i in record["inputs"]] == [
        str(checkpoint.resolve(r).resolve()) for r in runs.values()
    ]
    assert all(len(i["manifest_sha256"]) == 64 for i in record["inputs"])

    think, plain, got = full_states(runs["think"], runs["plain"], merged)
    assert_exactly(got, weighted_sum([think, plain], [0.8, 0.2]))
    assert not torch.equal(got["embedding.word_embeddings.weight"], think["embedding.word_embeddings.weight"])

    after = train_ranks(
        1,
        overrides(
            dataset,
            tmp_path / "next",
            *SFT,
            "run.train_steps=1",
            f"checkpoint.load={merged}",  # weights only: no load_optimizer=false needed
        ),
    )
    assert len(after["loss"]) == 1 and math.isfinite(after["loss"][0])


# ----------------------------------------------------------------------------- layouts


@pytest.fixture(scope="module")
def layout_inputs(dataset, tmp_path_factory) -> list[Path]:
    """Three tiny-MoE SFT checkpoints (different seeds) saved under TP2+SP, EP2 and PP2."""
    root = tmp_path_factory.mktemp("inputs")
    return [
        save(
            dataset,
            root / "tp2" / "ckpt",
            2,
            *SFT,
            "run.seed=11",
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
        ),
        save(dataset, root / "ep2" / "ckpt", 2, *SFT, "run.seed=12", "parallel.expert=2"),
        save(dataset, root / "pp2" / "ckpt", 2, *SFT, "run.seed=13", "parallel.pipeline=2"),
    ]


def test_inputs_under_three_layouts_merged_under_tp2_read_under_tp1(layout_inputs, tmp_path):
    weights = [0.5, 0.3, 0.2]
    out = tmp_path / "merged"
    layout = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
    run_distributed(_merge, 2, [str(p) for p in layout_inputs], weights, str(out), layout, timeout=180)
    from megatron_prefpack.training import checkpoint

    assert checkpoint.read_state(out).world_size == 2
    *inputs, got = full_states(*layout_inputs, out)
    assert_exactly(got, weighted_sum(inputs, weights))
    # Each input contributes: the merge is none of them.
    for state in inputs:
        assert not torch.equal(got["output_layer.weight"], state["output_layer.weight"])


def test_weights_one_zero_give_input_a_bit_for_bit(layout_inputs, tmp_path):
    out = tmp_path / "merged"
    a, b = layout_inputs[0], layout_inputs[1]
    run_distributed(_merge, 2, [str(a), str(b)], [1.0, 0.0], str(out), ["parallel.expert=2"], timeout=180)
    state_a, got = full_states(a, out)
    assert_exactly(got, state_a)


def test_reward_models_merge_with_their_heads(dataset, tmp_path):
    inputs = [
        save(
            dataset,
            tmp_path / f"rm{seed}" / "ckpt",
            1,
            *RM,
            f"run.seed={seed}",
            f"objective.rm.head_init_std={std}",
        )
        for seed, std in ((1, 0.5), (2, 0.2))
    ]
    out = tmp_path / "merged"
    run_distributed(_merge, 1, [str(p) for p in inputs], [0.25, 0.75], str(out), [], timeout=180)
    *states, got = full_states(*inputs, out)
    assert "output_layer.weight" in got and got["output_layer.weight"].shape[0] == 1  # the reward head
    assert not torch.equal(states[0]["output_layer.weight"], states[1]["output_layer.weight"])
    assert_exactly(got, weighted_sum(states, [0.25, 0.75]))


# ----------------------------------------------------------------------------- bad input


def _edited_copy(source: Path, target: Path, **changes: Any) -> Path:
    """A copy of checkpoint ``source`` whose ``prefpack.json`` has ``changes`` (``model=`` edits
    the stored config's model section): what the merge reads before it loads any tensor."""
    from megatron_prefpack.training import checkpoint

    ckpt = checkpoint.resolve(source)
    shutil.copytree(ckpt, target)
    meta = json.loads((target / checkpoint.META).read_text())
    if "model" in changes:
        config = yaml.safe_load(meta["config_yaml"])
        config["model"].update(changes.pop("model"))
        meta["config_yaml"] = yaml.safe_dump(config, sort_keys=False)
    meta.update(changes)
    (target / checkpoint.META).write_text(json.dumps(meta))
    return target


def test_bad_input_exits_2_naming_the_cause(layout_inputs, tmp_path, capsys):
    a, b = (str(p) for p in layout_inputs[:2])
    out = str(tmp_path / "out")
    both = ["--input", a, "--input", b]

    assert "no such checkpoint" in cli_error(
        capsys, "--input", a, "--input", str(tmp_path / "nope"), "--weights", "0.5", "0.5", "--output", out
    )
    assert "two or more" in cli_error(capsys, "--input", a, "--weights", "1", "--output", out)
    assert "3 given for 2" in cli_error(capsys, *both, "--weights", "0.5", "0.25", "0.25", "--output", out)
    assert "sum to 1.1, not 1" in cli_error(capsys, *both, "--weights", "0.8", "0.3", "--output", out)
    assert "nan is not a finite number" in cli_error(capsys, *both, "--weights", "nan", "1", "--output", out)

    deeper = _edited_copy(Path(b), tmp_path / "deeper", model={"num_layers": 3})
    err = cli_error(capsys, "--input", a, "--input", str(deeper), "--weights", "0.5", "0.5", "--output", out)
    assert "another architecture" in err and "model.num_layers is 3 there, 2 in" in err

    base = {"path": a, "step": 3, "manifest_sha256": "0" * 64}
    lora = _edited_copy(Path(b), tmp_path / "lora", base=base)
    err = cli_error(capsys, "--input", a, "--input", str(lora), "--weights", "0.5", "0.5", "--output", out)
    assert "a LoRA checkpoint" in err and "prefpack merge-lora first" in err

    reward = _edited_copy(Path(b), tmp_path / "reward", objective="rm")
    err = cli_error(capsys, "--input", a, "--input", str(reward), "--weights", "0.5", "0.5", "--output", out)
    assert "objective.type 'rm': a reward model" in err

    err = cli_error(capsys, *both, "--weights", "0.5", "0.5", "--output", out, "--set", "model.num_layers=4")
    assert "override 'model.num_layers=4': only parallel.* keys" in err

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    err = cli_error(capsys, *both, "--weights", "0.5", "0.5", "--output", str(tmp_path / "full"))
    assert "exists and is not an empty directory" in err

    err = cli_error(capsys, *both, "--weights", "0.5", "0.5", "--output", out, "parallel.tensor=2")
    assert "parallel" in err and "world size 1" in err
    assert not Path(out).exists()


def test_weights_need_not_sum_to_one_with_allow_any_sum(layout_inputs, tmp_path):
    from megatron_prefpack.training.merge_checkpoints import plan_merge

    plan = plan_merge(layout_inputs[:2], [1.5, 1.5], tmp_path / "out", allow_any_sum=True)
    assert [i.weight for i in plan.inputs] == [1.5, 1.5]
    assert plan.config.parallel.tensor == 1  # the merge's layout, not input A's (TP2)


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prefpack(["merge", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for says in ("--weights", "Think-Fusion", "merge-lora", "parallel.*", "merge.json"):
        assert says in out
