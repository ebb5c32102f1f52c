"""Megatron DDP's overlapped communication and ``parallel.pipeline_layout`` in ``prefpack train``
(CPU, gloo, fp32 unless stated).

- overlapped gradient reduction (several buckets: ``ddp.bucket_size`` small), with the
  distributed optimizer also overlapped parameter all-gathers, gives bit-identical losses,
  held-out evaluations and weights (a checkpoint saved right after a step, and the final one)
  to the same run without overlap: DP2, PP2 x DP2 (the schedule's ``grad_sync_func``), and
  with the distributed optimizer DP2 and PP2 x DP2 with a virtual pipeline (its
  ``param_sync_func``). Exact, not to rounding: overlap changes when each bucket is reduced,
  never what is summed (see ``DISTRIBUTED_OPTIMIZER`` for gradient clipping);
- a step whose gradients are NaN is skipped under overlap exactly as without it;
- ``ddp.bucket_size`` sets the number of buckets; ``ddp.grad_reduce_in_fp32`` the gradient
  buffers' dtype, and a bf16 model trains with bf16 reductions;
- uneven pipeline layouts (``"Et|tttL"``, and ``"Et|t|t|tL"`` with a virtual pipeline) follow
  the single-process loss trajectory and end at its weights (to float rounding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.test_faults import _train_with_poisoned_steps
from tests.test_train import _save_initial_weights, make_dataset, overrides

pytestmark = pytest.mark.slow

STEPS = [
    "model.num_layers=4",
    "data.global_batch_size=8",  # two micro-batches of 2 rows per DP rank at DP2
    "data.eval_fraction=0.2",
    "run.eval_interval=2",
    "checkpoint.interval=1",
    "checkpoint.keep=0",
]
OVERLAP = ["ddp.overlap_grad_reduce=true", "ddp.bucket_size=2000"]
DISTRIBUTED_OPTIMIZER = ["parallel.distributed_optimizer=true", "optimizer.clip_grad=0"]
"""The distributed optimizer shards each bucket over the DP ranks, so ``bucket_size`` moves the
shard boundaries and with them how the gradient norm's partial sums are grouped (measured: a
1e-7 relative difference in the norm, then in the clipped update). Without clipping nothing
depends on the grouping and the comparison is exact."""
PARAM_GATHER = [*OVERLAP, "ddp.overlap_param_gather=true"]
CASES = {
    "dp2": (2, [], OVERLAP),
    "dp2_distributed_optimizer": (2, DISTRIBUTED_OPTIMIZER, PARAM_GATHER),
    "pp2_dp2": (4, ["parallel.pipeline=2"], OVERLAP),
    "pp2_vpp2_dp2_distributed_optimizer": (
        4,
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", *DISTRIBUTED_OPTIMIZER],
        PARAM_GATHER,
    ),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def initial_weights(dataset, tmp_path_factory) -> list[str]:
    """One set of starting weights for every layout (Megatron's init differs per layout)."""
    path = tmp_path_factory.mktemp("init") / "ckpt"
    args = overrides(dataset, path.parent / "run", *STEPS)
    run_distributed(_save_initial_weights, 1, args, str(path), timeout=120)
    return [f"checkpoint.load={path}", "checkpoint.load_optimizer=false"]


def _train(args: list[str]) -> dict:
    """Rank body: train; per-step losses, held-out evaluations and the save dir."""
    from megatron_prefpack.training.config import load_config
    from megatron_prefpack.training.train import train

    cfg = load_config(None, args)
    result = train(cfg)
    return {
        "loss": [h["loss"] for h in result.history],
        "nonfinite": result.nonfinite_steps,
        "evals": result.evals,
        "save_dir": str(cfg.save_dir),
    }


def _weights(args: list[str], path: str) -> dict[str, torch.Tensor]:
    """Rank body (one process): the weights of checkpoint ``path`` in the model of ``args``."""
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import load_config, model_config
    from megatron_prefpack.training.model_setup import build_chunks, init_distributed, transformer_config

    cfg = load_config(None, args)
    init_distributed(cfg)
    try:
        model_cfg = model_config(cfg)
        chunks = build_chunks(model_cfg, transformer_config(cfg, model_cfg))
        checkpoint.load(path, chunks, restore_rng=False)
        return {
            k: v.detach().clone() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)
        }
    finally:
        platform.destroy()


def checkpoint_weights(args: list[str], save_dir: str, step: int) -> dict[str, torch.Tensor]:
    from megatron_prefpack.training.checkpoint import iteration_dir

    return run_distributed(_weights, 1, args, str(iteration_dir(Path(save_dir), step)), timeout=120)[0]


def train_ranks(world: int, args: list[str]) -> dict:
    return run_distributed(_train, world, args, timeout=300)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_overlapped_communication_changes_nothing(case, dataset, initial_weights, tmp_path):
    world, layout, overlap = CASES[case]
    base = overrides(dataset, tmp_path / "off", *STEPS, *initial_weights, *layout)
    off = train_ranks(world, base)
    on = train_ranks(
        world, [*overrides(dataset, tmp_path / "on", *STEPS, *initial_weights, *layout), *overlap]
    )
    assert on["loss"] == off["loss"]
    assert on["evals"] == off["evals"]
    assert len(off["evals"]) == 3  # before step 1, after step 2, at the end
    assert off["loss"][-1] < off["loss"][0]
    one_process = overrides(dataset, tmp_path / "load", *STEPS)
    for step in (1, 3):  # saved right after a step (parameters not yet gathered), and the last
        got = checkpoint_weights(one_process, on["save_dir"], step)
        want = checkpoint_weights(one_process, off["save_dir"], step)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_a_nonfinite_step_is_skipped_under_overlap(dataset, initial_weights, tmp_path):
    """Step 2's reduced gradients are NaN on every rank: skipped with and without overlap, and
    the steps after it (their parameters gathered from unchanged shards) agree exactly."""
    world, layout, overlap = CASES["dp2_distributed_optimizer"]
    args = [*STEPS, *initial_weights, *layout, "run.eval_interval=0", "checkpoint.interval=0"]
    off = run_distributed(_train_with_poisoned_steps, world, overrides(dataset, tmp_path / "off", *args), [2])
    on = run_distributed(
        _train_with_poisoned_steps, world, [*overrides(dataset, tmp_path / "on", *args), *overlap], [2]
    )
    assert off[0]["nonfinite"] == on[0]["nonfinite"] == 1
    assert on[0]["loss"] == off[0]["loss"]
    assert np.isfinite(on[0]["loss"][2])


def _wrapped_buffers(settings: list[dict], params_dtype: str) -> list[list[tuple[list[int], torch.dtype]]]:
    """Rank body (one process): tiny-moe (4 layers) wrapped with each of ``settings`` (DDPConfig
    keyword arguments); for each, every gradient buffer's bucket parameter sizes and dtype."""
    from megatron_prefpack.models.presets import preset
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training.config import DDPConfig, TrainConfig
    from megatron_prefpack.training.model_setup import (
        build_chunks,
        num_buckets,
        transformer_config,
        wrap_for_training,
    )

    platform.initialize()
    try:
        model_cfg = preset("tiny-moe")
        model_cfg.num_layers, model_cfg.params_dtype = 4, params_dtype
        found = []
        for ddp in settings:
            tcfg = transformer_config(TrainConfig(), model_cfg)
            model = wrap_for_training(build_chunks(model_cfg, tcfg), tcfg, False, DDPConfig(**ddp))
            buffers = [*model[0].buffers, *model[0].expert_parallel_buffers]
            found.append(
                [
                    ([sum(p.numel() for p in b.params_list) for b in buf.buckets], buf.grad_dtype)
                    for buf in buffers
                ]
            )
            assert num_buckets(model) == sum(len(sizes) for sizes, _ in found[-1])
        return found
    finally:
        platform.destroy()


def test_bucket_size_sets_the_number_of_buckets() -> None:
    """Without overlap a buffer is one bucket; with it, Megatron closes a bucket once it holds
    ``bucket_size`` parameters, so every bucket but the last of a buffer holds at least that."""
    sizes = [None, 4000, 1000]
    settings = [{}] + [{"overlap_grad_reduce": True, "bucket_size": size} for size in sizes[1:]]
    found = run_distributed(_wrapped_buffers, 1, settings, "float32")[0]
    counts = [sum(len(buckets) for buckets, _ in buffers) for buffers in found]
    assert counts[0] == len(found[0])  # one bucket per buffer
    assert counts[0] < counts[1] < counts[2]
    total = sum(sum(buckets) for buckets, _ in found[0])
    for size, buffers in zip(sizes[1:], found[1:], strict=True):
        assert sum(sum(buckets) for buckets, _ in buffers) == total  # every parameter, once
        for buckets, _ in buffers:
            assert all(numel >= size for numel in buckets[:-1])


def test_grad_reduce_in_fp32_sets_the_gradient_dtype() -> None:
    found = run_distributed(_wrapped_buffers, 1, [{}, {"grad_reduce_in_fp32": False}], "bfloat16")[0]
    assert {dtype for _, dtype in found[0]} == {torch.float32}
    assert {dtype for _, dtype in found[1]} == {torch.bfloat16}


def test_bf16_model_trains_with_bf16_overlapped_reduction(dataset, tmp_path):
    args = [*STEPS, "model.params_dtype=bfloat16", "run.eval_interval=0"]
    off = train_ranks(2, overrides(dataset, tmp_path / "off", *args, "ddp.grad_reduce_in_fp32=false"))
    on = train_ranks(
        2, [*overrides(dataset, tmp_path / "on", *args, "ddp.grad_reduce_in_fp32=false"), *OVERLAP]
    )
    assert np.isfinite(off["loss"]).all()
    assert on["loss"] == off["loss"]


LAYOUTS = {
    "pp2_uneven": ["parallel.pipeline=2", "parallel.pipeline_layout=Et|tttL"],
    "pp2_vpp2_uneven": [
        "parallel.pipeline=2",
        "parallel.virtual_pipeline=2",
        "parallel.pipeline_layout=Et|t|t|tL",
    ],
}


@pytest.fixture(scope="module")
def single_process_run(dataset, initial_weights, tmp_path_factory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("single")
    args = overrides(dataset, path, *STEPS, *initial_weights, "run.eval_interval=0")
    run = train_ranks(1, args)
    return run, checkpoint_weights(overrides(dataset, path / "load", *STEPS), run["save_dir"], 3)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layout_follows_single_process(
    layout, dataset, initial_weights, single_process_run, tmp_path
):
    single, single_weights = single_process_run
    args = overrides(dataset, tmp_path, *STEPS, *initial_weights, "run.eval_interval=0", *LAYOUTS[layout])
    got = train_ranks(2, args)
    np.testing.assert_allclose(got["loss"], single["loss"], rtol=2e-5, atol=1e-6)
    weights = checkpoint_weights(overrides(dataset, tmp_path / "load", *STEPS), got["save_dir"], 3)
    assert weights.keys() == single_weights.keys()
    for key, want in single_weights.items():
        torch.testing.assert_close(weights[key], want, rtol=1e-4, atol=1e-6, msg=key)


def _stages(args: list[str]) -> list[tuple[list[int], bool, bool]]:
    """Rank body: this rank's model chunks as (global layer numbers, pre_process, post_process)."""
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training.config import load_config, model_config
    from megatron_prefpack.training.model_setup import build_chunks, init_distributed, transformer_config

    cfg = load_config(None, args)
    init_distributed(cfg)
    try:
        model_cfg = model_config(cfg)
        chunks = build_chunks(model_cfg, transformer_config(cfg, model_cfg))
        return [
            ([layer.layer_number for layer in c.decoder.layers], c.pre_process, c.post_process)
            for c in chunks
        ]
    finally:
        platform.destroy()


@pytest.mark.parametrize(
    ("layout", "want"),
    [
        ("pp2_uneven", [[([1], True, False)], [([2, 3, 4], False, True)]]),
        (
            "pp2_vpp2_uneven",
            [[([1], True, False), ([3], False, False)], [([2], False, False), ([4], False, True)]],
        ),
    ],
)
def test_pipeline_layout_places_layers_embedding_and_loss(layout, want, dataset, tmp_path):
    assert run_distributed(_stages, 2, overrides(dataset, tmp_path, *STEPS, *LAYOUTS[layout])) == want


def test_resume_under_other_ddp_settings_continues_exactly(dataset, initial_weights, tmp_path):
    """DDP settings may change on resume (``training.config`` notes them): a checkpoint saved
    with one bucket per buffer, resumed with small overlapped buckets, continues exactly.
    (With the distributed optimizer, whose state is saved per bucket, such a change is refused:
    ``tests/test_config.py``.)"""
    world, layout, overlap = CASES["dp2"]
    sft = ["objective.type=sft", "reference.mode=none"]  # no reference checkpoint to name
    args = [*STEPS, *initial_weights, *layout, *sft, "run.eval_interval=0"]
    straight = train_ranks(world, overrides(dataset, tmp_path / "a", *args))
    resume = [
        f"checkpoint.load={Path(straight['save_dir']) / 'iter_0000002'}",
        "checkpoint.load_optimizer=true",
    ]
    resumed = train_ranks(world, [*overrides(dataset, tmp_path / "b", *args, *resume), *overlap])
    assert resumed["loss"] == straight["loss"][2:]
    one_process = overrides(dataset, tmp_path / "load", *STEPS)
    got = checkpoint_weights(one_process, resumed["save_dir"], 3)
    want = checkpoint_weights(one_process, straight["save_dir"], 3)
    for key in want:
        assert torch.equal(got[key], want[key]), key
