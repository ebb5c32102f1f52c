"""LoRA in ``prefpack train``, its checkpoints, ``prefpack merge-lora`` (CPU, gloo, tiny MoE).

- only the adapters are in Megatron's gradient buffers and the optimizer (counted against the
  model), and training leaves the base weights bit-identical;
- ``reference.mode: base`` (the policy with its adapters off) gives the same losses as the
  offline table that ``prefpack ref-logprobs`` computes from the base checkpoint with a plain
  model;
- LoRA DPO under TP2+SP, EP2 (routed-expert adapters on) and PP2 follows one process;
- resume (also with the distributed optimizer over DP2) reproduces the uninterrupted run;
  a changed or missing base checkpoint is refused;
- a LoRA checkpoint holds the adapters and their Adam moments only, and names its base;
- the merged checkpoint loads as a plain model with the LoRA model's log-probs;
- config errors name the keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import DistributedRunError, run_distributed
from tests.test_train import _save_initial_weights, _write_reference, make_dataset, overrides, train_ranks

pytestmark = pytest.mark.slow

LORA = [
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.routed_experts=true",
    "reference.mode=base",
    "optimizer.lr=2e-2",
    "optimizer.min_lr=2e-2",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def base_ckpt(dataset, tmp_path_factory) -> Path:
    """A plain (no LoRA) model's initial weights: the base every LoRA run here starts from."""
    path = tmp_path_factory.mktemp("base") / "ckpt"
    run_distributed(_save_initial_weights, 1, overrides(dataset, path.parent / "run"), str(path), timeout=120)
    return path


def lora_args(dataset: Path, run_dir: Path, base: Path, *extra: str) -> list[str]:
    return overrides(
        dataset, run_dir, f"checkpoint.load={base}", "checkpoint.load_optimizer=false", *LORA, *extra
    )


@pytest.fixture(scope="module")
def single_lora_run(dataset, base_ckpt, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("lora1")
    return {"dir": run_dir, **train_ranks(1, lora_args(dataset, run_dir, base_ckpt))}


# ----------------------------------------------------------------------------- what trains


def _count_trainable(args: list[str], base: str) -> dict:
    """Rank body: build the LoRA model as the trainer does; what DDP and the optimizer hold."""
    from megatron_prefpack.models.lora import is_adapter_parameter
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import load_config, model_config
    from megatron_prefpack.training.model_setup import (
        build_chunks,
        build_optimizer,
        init_distributed,
        transformer_config,
        wrap_for_training,
    )

    cfg = load_config(None, args)
    init_distributed(cfg)
    try:
        model_cfg = model_config(cfg)
        tcfg = transformer_config(cfg, model_cfg)
        chunks = build_chunks(model_cfg, tcfg)
        checkpoint.load(base, chunks, restore_rng=False)
        named = dict(chunks[0].named_parameters())
        adapters = {name for name in named if is_adapter_parameter(name)}
        model = wrap_for_training(chunks, tcfg, False)
        optimizer = build_optimizer(cfg, model, tcfg)
        in_buffers = {
            p
            for chunk in model
            for b in chunk.buffers + chunk.expert_parallel_buffers
            for p in b.param_index_map
        }
        in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
        by_id = {id(p): n for n, p in named.items()}
        return {
            "adapters": sorted(adapters),
            "adapter_numel": sum(named[n].numel() for n in adapters),
            "total_numel": sum(p.numel() for p in named.values()),
            "requires_grad": sorted(n for n, p in named.items() if p.requires_grad),
            "buffers": sorted(by_id[id(p)] for p in in_buffers),
            "optimizer": sorted(by_id[id(p)] for p in in_optimizer),
            "buffer_numel": sum(
                b.numel_unpadded for chunk in model for b in chunk.buffers + chunk.expert_parallel_buffers
            ),
        }
    finally:
        platform.destroy()


def test_only_adapters_are_in_grad_buffers_and_optimizer(dataset, base_ckpt, tmp_path):
    got = run_distributed(_count_trainable, 1, lora_args(dataset, tmp_path, base_ckpt), str(base_ckpt))[0]
    # tiny-moe: 2 layers x (qkv, proj, fc1, fc2 of the MoE's ... ) adapted; at least qkv/proj per layer.
    assert len(got["adapters"]) >= 2 * 2 * 2
    assert got["requires_grad"] == got["adapters"]
    assert got["buffers"] == got["adapters"]
    assert got["optimizer"] == got["adapters"]
    assert got["buffer_numel"] == got["adapter_numel"]
    assert 0 < got["adapter_numel"] < got["total_numel"] / 2


def _weights(args: list[str], load: str) -> dict:
    """Rank body: the model of ``args`` loaded from ``load``, as name -> tensor."""
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import load_config, model_config
    from megatron_prefpack.training.model_setup import build_chunks, init_distributed, transformer_config

    cfg = load_config(None, args, check_reference=False)
    init_distributed(cfg)
    try:
        model_cfg = model_config(cfg)
        chunks = build_chunks(model_cfg, transformer_config(cfg, model_cfg))
        checkpoint.load(load, chunks, restore_rng=False)
        return {name: p.detach().clone() for name, p in chunks[0].named_parameters()}
    finally:
        platform.destroy()


def test_training_moves_adapters_only(dataset, base_ckpt, single_lora_run, tmp_path):
    args = lora_args(dataset, tmp_path, base_ckpt)
    trained = run_distributed(_weights, 1, args, single_lora_run["checkpoint"])[0]
    initial = run_distributed(_weights, 1, args, str(base_ckpt))[0]
    moved = sorted(n for n in trained if not bool((trained[n] == initial[n]).all()))
    from megatron_prefpack.models.lora import is_adapter_parameter

    assert moved and all(is_adapter_parameter(n) for n in moved)
    assert any(n.endswith("lora_B") for n in moved) and any(n.endswith("lora_A") for n in moved)
    # DPO from the base: step 1 is the base model exactly (B = 0), and it learns.
    losses = single_lora_run["loss"]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6)
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- reference


def test_base_reference_equals_the_offline_table_of_the_base_model(
    dataset, base_ckpt, single_lora_run, tmp_path
):
    """The offline table comes from a plain model (no ``model.lora``) on the base checkpoint;
    a LoRA run reading it takes the same steps as one whose reference is its adapters off."""
    table = tmp_path / "ref.npy"
    run_distributed(_write_reference, 1, overrides(dataset, tmp_path / "r"), str(base_ckpt), str(table))
    offline = train_ranks(
        1,
        lora_args(dataset, tmp_path / "off", base_ckpt, "reference.mode=offline", f"reference.path={table}"),
    )
    np.testing.assert_allclose(offline["loss"], single_lora_run["loss"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(offline["grad_norm"], single_lora_run["grad_norm"], rtol=1e-5)


# ----------------------------------------------------------------------------- layouts


LAYOUTS = {
    "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "ep2": (2, ["parallel.expert=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "cp2": (2, ["parallel.context=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_layouts_follow_single_process(layout, dataset, base_ckpt, single_lora_run, tmp_path):
    world, extra = LAYOUTS[layout]
    got = train_ranks(world, lora_args(dataset, tmp_path, base_ckpt, *extra))
    np.testing.assert_allclose(got["loss"], single_lora_run["loss"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], single_lora_run["grad_norm"], rtol=2e-3)


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2"])
def test_lora_sft_layouts_follow_single_process(layout, dataset, base_ckpt, tmp_path):
    """Multi-response SFT with LoRA (no reference) under a layout equals one process."""
    world, extra = LAYOUTS[layout]
    sft = ["objective.type=sft", "reference.mode=none"]
    single = train_ranks(1, lora_args(dataset, tmp_path / "one", base_ckpt, *sft))
    got = train_ranks(world, lora_args(dataset, tmp_path / "par", base_ckpt, *sft, *extra))
    assert single["loss"][-1] < single["loss"][0]
    np.testing.assert_allclose(got["loss"], single["loss"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], single["grad_norm"], rtol=2e-3)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    ("world", "optimizer"),
    [(1, "parallel.distributed_optimizer=false"), (2, "parallel.distributed_optimizer=true")],
    ids=["adam", "dp2_distributed_adam"],
)
def test_lora_resume_reproduces_the_uninterrupted_run(world, optimizer, dataset, base_ckpt, tmp_path):
    steps = ["run.train_steps=4", optimizer]
    straight = train_ranks(
        world, lora_args(dataset, tmp_path / "a", base_ckpt, *steps, "checkpoint.interval=2")
    )
    middle = tmp_path / "a" / "checkpoints" / "iter_0000002"
    resumed = train_ranks(
        world,
        lora_args(
            dataset,
            tmp_path / "b",
            base_ckpt,
            *steps,
            f"checkpoint.load={middle}",
            "checkpoint.load_optimizer=true",
        ),
    )
    assert len(resumed["loss"]) == 2
    np.testing.assert_array_equal(resumed["loss"], straight["loss"][2:])
    np.testing.assert_array_equal(resumed["grad_norm"], straight["grad_norm"][2:])


def test_lora_checkpoint_holds_adapters_only_and_names_its_base(
    dataset, base_ckpt, single_lora_run, tmp_path
):
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_prefpack.models.lora import is_adapter_parameter
    from megatron_prefpack.training import checkpoint

    ckpt = Path(single_lora_run["checkpoint"])
    state = checkpoint.read_state(ckpt)
    assert state.base == checkpoint.identity(base_ckpt)
    counts = run_distributed(_count_trainable, 1, lora_args(dataset, tmp_path, base_ckpt), str(base_ckpt))[0]
    metadata = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    tensors = {k: m for k, m in metadata.items() if hasattr(m, "size")}
    model_keys = [k for k in tensors if not k.startswith("optimizer")]
    # Routed experts' adapters are stored stacked per layer (Megatron's SequentialMLP keys).
    assert model_keys and all(is_adapter_parameter(k) for k in model_keys)
    numel = {k: int(np.prod(m.size)) for k, m in tensors.items()}
    # fp32 weights and Adam's two fp32 moments of the adapters, nothing else.
    assert sum(numel[k] for k in model_keys) == counts["adapter_numel"]
    assert sum(numel.values()) == 3 * counts["adapter_numel"]
    base_numel = sum(
        int(np.prod(m.size))
        for m in FileSystemReader(str(checkpoint.resolve(base_ckpt)))
        .read_metadata()
        .state_dict_metadata.values()
        if hasattr(m, "size")
    )
    assert base_numel == counts["total_numel"] - counts["adapter_numel"]


def test_resume_refuses_a_changed_or_missing_base(dataset, base_ckpt, tmp_path):
    copy = tmp_path / "base_copy"
    shutil.copytree(base_ckpt, copy)
    first = train_ranks(1, lora_args(dataset, tmp_path / "a", copy, "run.train_steps=1"))
    manifest = Path(checkpoint_dir(copy)) / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    again = lora_args(dataset, tmp_path / "a", copy, "run.train_steps=2")
    with pytest.raises(DistributedRunError, match="has changed"):
        train_ranks(1, again)
    shutil.rmtree(copy)
    with pytest.raises(DistributedRunError, match="is gone"):
        train_ranks(1, [a for a in again if not a.startswith("checkpoint.load=")])
    assert first["checkpoint"]


def checkpoint_dir(save_dir: Path) -> str:
    from megatron_prefpack.training import checkpoint

    return str(checkpoint.resolve(save_dir))


# ----------------------------------------------------------------------------- merge


def _merge(args: list[str], load: str, output: str) -> None:
    from megatron_prefpack.training.config import load_config
    from megatron_prefpack.training.merge_lora import merge_lora

    merge_lora(load_config(None, args, check_reference=False), load, Path(output))


def test_merged_checkpoint_is_a_plain_model_with_the_lora_logprobs(
    dataset, base_ckpt, single_lora_run, tmp_path
):
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import config_from_yaml, model_config

    args = lora_args(dataset, tmp_path / "r", base_ckpt)
    lora_ckpt = single_lora_run["checkpoint"]
    run_distributed(_merge, 1, args, lora_ckpt, str(tmp_path / "merged"))
    merged = checkpoint.resolve(tmp_path / "merged")
    state = checkpoint.read_state(merged)
    assert state.base is None and state.step == checkpoint.read_state(lora_ckpt).step
    assert model_config(config_from_yaml(state.config_yaml, "merged")).lora is None

    plain = overrides(dataset, tmp_path / "p")
    tables = {}
    for name, run_args, load in (
        ("lora", args, lora_ckpt),
        ("merged", plain, str(tmp_path / "merged")),
        ("base", plain, str(base_ckpt)),
    ):
        run_distributed(_write_reference, 1, run_args, load, str(tmp_path / f"{name}.npy"))
        tables[name] = np.load(tmp_path / f"{name}.npy")
    np.testing.assert_allclose(tables["merged"], tables["lora"], rtol=0, atol=2e-5)
    assert np.abs(tables["lora"] - tables["base"]).max() > 1e-3  # the adapters changed the model
    header = json.loads((tmp_path / "merged.npy.json").read_text())
    assert "lora" not in header["model"] or header["model"]["lora"] is None


# ----------------------------------------------------------------------------- config


def test_reference_base_config_errors_name_the_keys(dataset, base_ckpt, tmp_path):
    from megatron_prefpack.training.config import ConfigError, load_config

    plain = overrides(dataset, tmp_path, "reference.mode=base")
    with pytest.raises(ConfigError, match=r"reference\.mode: 'base' .*model\.lora"):
        load_config(None, plain)
    with pytest.raises(ConfigError, match=r"reference\.path: reference\.mode 'base'"):
        load_config(None, lora_args(dataset, tmp_path, base_ckpt, f"reference.path={base_ckpt}"))
    with pytest.raises(ConfigError, match=r"reference\.load: reference\.mode 'base'"):
        load_config(None, lora_args(dataset, tmp_path, base_ckpt, f"reference.load={base_ckpt}"))
    load_config(None, lora_args(dataset, tmp_path, base_ckpt))  # and the LoRA run itself is fine


def test_lora_reward_model_resumes_with_its_head(dataset, base_ckpt, tmp_path):
    """A LoRA reward model from a language-model base: the fresh head trains with the adapters,
    its checkpoint holds both, and a resume reproduces the uninterrupted run."""
    rm = ["objective.type=rm", "reference.mode=none", "run.train_steps=3"]
    straight = train_ranks(
        1, lora_args(dataset, tmp_path / "a", base_ckpt, *rm, "checkpoint.interval=1", "checkpoint.keep=0")
    )
    middle = tmp_path / "a" / "checkpoints" / "iter_0000001"
    resumed = train_ranks(
        1,
        lora_args(
            dataset,
            tmp_path / "b",
            base_ckpt,
            *rm,
            f"checkpoint.load={middle}",
            "checkpoint.load_optimizer=true",
        ),
    )
    np.testing.assert_array_equal(resumed["loss"], straight["loss"][1:])
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(middle)).read_metadata().state_dict_metadata
    assert "output_layer.weight" in keys
