"""``prefpack plan`` against independent measurements.

1. Static bytes: the planner's parameter, gradient-buffer and optimizer bytes of a rank (its
   model built on the meta device with a fake process group) equal those of the real model,
   Megatron DDP and Megatron optimizer built by the trainer's code on gloo ranks and measured
   tensor by tensor (unique storages; Adam state materialised by one optimizer step), under
   TP2 + SP, PP2 (uneven split), EP2 with the distributed optimizer, and TP2 x DP2 with it.
2. Activations: the planner's per-micro-batch bytes against the bytes of the tensors the real
   model saves for backward in one forward (``saved_tensors_hooks``, unique storages), with and
   without full recompute, within a stated tolerance.
3. The command: ``--json`` shape, ``--search`` results fit and are ordered, a layout that does
   not divide exits 2 naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_prefpack.training.config import TrainConfig, apply_override, model_config
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def _config(settings: dict[str, object]) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in {"data.seq_len": 64, "data.global_batch_size": 8, **settings}.items():
        cfg = apply_override(cfg, f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}")
    return cfg


def _storage_bytes(tensors: list[torch.Tensor]) -> tuple[int, set[int]]:
    """Bytes of the distinct storages behind ``tensors`` and their data pointers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()), set(storages)


def _measure_real(settings: dict[str, object]) -> dict[str, int]:
    """Build the trainer's model, DDP and optimizer for this rank and measure their bytes."""
    import torch.distributed as dist

    from megatron_prefpack.training import model_setup
    from megatron_prefpack.training.checkpoint import optimizer_members

    cfg = _config(settings)
    model_cfg = model_config(cfg)
    model_setup.init_distributed(cfg)
    tcfg = model_setup.transformer_config(cfg, model_cfg)
    chunks = model_setup.build_chunks(model_cfg, tcfg)
    model = model_setup.wrap_for_training(chunks, tcfg, cfg.parallel.distributed_optimizer, cfg.ddp)
    optimizer = model_setup.build_optimizer(cfg, model, tcfg)
    params = [p for chunk in model for p in chunk.module.parameters()]
    for p in params:
        p.main_grad.zero_()
    optimizer.step()  # Adam creates its moments on the first step
    param_bytes, param_storages = _storage_bytes(params)
    grad_bytes, grad_storages = _storage_bytes([p.main_grad for p in params])
    owned = param_storages | grad_storages
    optimizer_bytes = 0
    for member in optimizer_members(optimizer):
        for group in member.optimizer.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in owned:  # a master copy, not a model view
                    optimizer_bytes += p.numel() * p.element_size()
                state = member.optimizer.state.get(p, {})
                optimizer_bytes += sum(
                    v.numel() * v.element_size()
                    for k, v in state.items()
                    if torch.is_tensor(v) and k != "step"
                )
    return {
        "rank": dist.get_rank(),
        "params": sum(p.numel() for p in params),
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": optimizer_bytes,
    }


LAYOUTS = {
    "tp2_sp": (2, {"parallel.tensor": 2, "parallel.sequence_parallel": "true"}),
    "pp2_uneven": (
        2,
        {"parallel.pipeline": 2, "parallel.first_stage_layers": 1, "parallel.last_stage_layers": 2},
    ),
    "ep2_distopt": (2, {"parallel.expert": 2, "parallel.distributed_optimizer": "true"}),
    "tp2_dp2_distopt": (
        4,
        {
            "parallel.tensor": 2,
            "parallel.sequence_parallel": "true",
            "parallel.distributed_optimizer": "true",
        },
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_static_bytes_equal_the_real_model(name: str) -> None:
    from megatron_prefpack.training.plan_memory import rank_static

    world, layout = LAYOUTS[name]
    settings = {"model.preset": "tiny-mla-moe", "model.params_dtype": "bfloat16", **layout}
    measured = run_distributed(_measure_real, world, settings, timeout=240)
    cfg = _config(settings)
    model_cfg = model_config(cfg)
    for real in measured:
        planned = rank_static(cfg, model_cfg, world, real["rank"])
        got = {k: getattr(planned, k) for k in ("params", "param_bytes", "grad_bytes", "optimizer_bytes")}
        print(f"{name} rank {real['rank']}: real {real} planned {got}")
        assert got == {k: real[k] for k in got}


# ----------------------------------------------------------------------------- activations

ACTIVATION_TOLERANCE = 0.25
"""Planned per-micro-batch activation bytes within 25 % of the measured saved tensors."""


def _measure_saved(settings: dict[str, object], row_length: int) -> int:
    """Bytes of the distinct storages saved for backward by one forward + log-prob of the real
    model on one rank (parameters excluded)."""
    from megatron_prefpack.losses.logprobs import token_logprobs
    from megatron_prefpack.models.forward import model_forward
    from megatron_prefpack.training import model_setup
    from tests.test_model_equivalence import make_batch, make_groups

    cfg = _config(settings)
    model_cfg = model_config(cfg)
    model_setup.init_distributed(cfg)
    tcfg = model_setup.transformer_config(cfg, model_cfg)
    (model,) = model_setup.build_chunks(model_cfg, tcfg)
    groups = make_groups(seed=3, vocab_size=model_cfg.vocab_size, num_groups=40)
    batch = make_batch(groups, "packed", row_length)
    batch = type(batch)(
        **{k: v[:1] if torch.is_tensor(v) and v.dim() == 2 else v for k, v in vars(batch).items()}
    )
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits = model_forward(model, batch, backend="reference")
        token_logprobs(logits, batch.labels).sum()
    return sum(saved.values())


FULL_RECOMPUTE = {
    "performance.recompute_granularity": "full",
    "performance.recompute_method": "uniform",
    "performance.recompute_num_layers": 1,
}


@pytest.mark.parametrize(
    ("preset", "recompute"),
    [("demo-axk1", {}), ("demo-axk1", FULL_RECOMPUTE), ("demo-moe", {}), ("demo-moe", FULL_RECOMPUTE)],
)
def test_activation_formula_against_saved_tensors(preset: str, recompute: dict[str, object]) -> None:
    """fp32 and the reference backend, as the CPU runs them (its dense SDPA keeps the scores,
    which the formula counts for that backend only)."""
    from megatron_prefpack.training.plan_memory import StageShape, stage_activations

    settings = {
        "model.preset": preset,
        "model.params_dtype": "float32",
        "model.attention_backend": "reference",
        "data.seq_len": 256,
        **recompute,
    }
    (measured,) = run_distributed(_measure_saved, 1, settings, 256)
    cfg = _config(settings)
    model_cfg = model_config(cfg)
    whole = StageShape((tuple(range(model_cfg.num_layers)),), embedding=True, output=True)
    planned = stage_activations(cfg, model_cfg, whole, stage=0, microbatches=1).per_microbatch
    print(
        f"{preset} {recompute or 'no recompute'}: measured {measured:,} B, planned {planned:,.0f} B "
        f"({planned / measured:.3f}x)"
    )
    assert abs(planned / measured - 1) < ACTIVATION_TOLERANCE


# ----------------------------------------------------------------------------- the command

TINY = [
    "--set",
    "model.preset=tiny-moe",
    "--set",
    "data.path=",
    "--set",
    "reference.mode=none",
    "--set",
    "objective.type=sft",
    "--set",
    "data.global_batch_size=8",
    "--set",
    "data.micro_batch_size=1",
]


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from megatron_prefpack.cli import main

    code = main(["plan", "--config", str(ROOT / "examples/configs/demo_dpo.yaml"), *TINY, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _plan(
        capsys, "--gpus", "2", "--gpu", "h200-141gb", "--json", "--set", "parallel.pipeline=2"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["fits"] is True and result["gpu"] == "h200-141gb" and result["gpus"] == 2
    assert result["step_time_s"] > 0
    assert [r["stage"] for r in result["ranks"]] == [0, 1] and [r["rank"] for r in result["ranks"]] == [0, 1]
    for r in result["ranks"]:
        parts = r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] + r["activation_bytes"]
        assert r["total_bytes"] == parts + r["reference_bytes"]
        assert r["params"] > 0 and r["param_bytes"] == 4 * r["params"]  # fp32, no distributed optimizer
    assert "full rows" in result["rows"]["source"]


def test_search_lists_fitting_layouts_fastest_first(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _plan(capsys, "--gpus", "4", "--gpu", "h100-80gb", "--search", "--json", "--top", "50")
    assert code == 0, err
    results = json.loads(out)
    assert len(results) > 3 and all(r["fits"] for r in results)
    times = [r["step_time_s"] for r in results]
    assert times == sorted(times)
    layouts = {
        (r["layout"]["tensor"], r["layout"]["pipeline"], r["layout"]["expert"], r["layout"]["context"])
        for r in results
    }
    assert len(layouts) == len(results) and (1, 1, 1, 1) in layouts


def test_a_layout_that_does_not_divide_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _plan(capsys, "--gpus", "4", "--gpu", "h100-80gb", "--set", "parallel.expert=3")
    assert code == 2
    assert "parallel.expert: 3 does not divide" in err
    code, _, err = _plan(capsys, "--gpus", "3", "--gpu", "h100-80gb", "--set", "parallel.tensor=2")
    assert code == 2 and "does not divide the world size 3" in err


def test_context_parallel_mla_plans_on_the_meta_device(capsys: pytest.CaptureFixture[str]) -> None:
    """A.X K1's YaRN table is sliced per CP rank with a pinned-memory index while it is built."""
    model = ["--set", "model.preset=ax-k1", "--set", "model.num_layers=2", "--set", "data.seq_len=8192"]
    args = ["--gpus", "2", "--gpu", "h100-80gb", "--json", *model, "--set", "parallel.context=2"]
    code, out, err = _plan(capsys, *args)
    assert code == 0, err
    assert json.loads(out)["layout"]["context"] == 2
