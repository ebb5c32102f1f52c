"""LoRA adapters on the Megatron model (``megatron_prefpack.models.lora``), fp32 on CPU.

One process: ``B = 0`` leaves the logits bit for bit those of the base model; with non-zero
``B`` the adapted model differs, ``adapters_disabled`` gives the base logits exactly, and
``merge_adapters`` gives the adapted logits from a plain model whose ``state_dict`` /
``sharded_state_dict`` keys are the unwrapped model's; ``freeze_base`` leaves gradients and
parameter counts on the adapters only; ``A`` is PEFT's kaiming-uniform, deterministic per module.

Parallel layouts (gloo processes): the model is the base preset with adapters, every tensor set
from its global checkpoint key (``fill_params_by_key``, so ``B`` is non-zero); the summed response
log-probs of packed rows and every adapter's gradient, reassembled to full shape from the ranks'
shards by the module's global name (independently of the checkpoint metadata), equal one
process's under TP2 with and without sequence parallelism (dense and MLA-MoE with routed-expert
adapters, experts split over expert-TP), EP2 and PP2. The initial ``A`` is the same in every
layout. A distributed checkpoint saved under TP2 loads under TP1 with equal adapters.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_prefpack.models.config import LoRAConfig, ModelConfigError
from tests.distributed import fill_params_by_key, run_distributed
from tests.test_model_equivalence import build, make_batch, make_groups, response_token_logprobs

DENSE_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
MLA_TARGETS = [
    "linear_q_down_proj",
    "linear_q_up_proj",
    "linear_kv_down_proj",
    "linear_kv_up_proj",
    "linear_proj",
    "linear_fc1",
    "linear_fc2",
]


def lora_for(name: str) -> LoRAConfig:
    """Rank 4, scale 2, no dropout; MLA: every MLA projection; MoE: the routed experts too."""
    targets = MLA_TARGETS if name == "tiny-mla-moe" else DENSE_TARGETS
    return LoRAConfig(rank=4, alpha=8.0, target_modules=targets, routed_experts=name != "tiny-dense")


def build_adapted(name: str, overrides: dict[str, Any] | None = None) -> tuple[Any, torch.nn.Module]:
    """The preset with :func:`lora_for`'s adapters; the MoE aux loss off (it depends on the
    batch's composition by design, see ``test_model_equivalence``)."""
    from megatron_prefpack.models.presets import preset

    moe = preset(name).moe
    changes = {"moe": dataclasses.replace(moe, aux_loss_coeff=0.0)} if moe else {}
    return build(name, overrides, lora=lora_for(name), **changes)


def _logits(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    from megatron_prefpack.models.forward import model_forward

    model.eval()
    with torch.no_grad():
        return model_forward(model, batch)


# ----------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"rank": 0}, "model.lora.rank"),
        ({"rank": 2.5}, "model.lora.rank"),
        ({"alpha": 0.0}, "model.lora.alpha"),
        ({"dropout": 1.0}, "model.lora.dropout"),
        ({"target_modules": []}, "model.lora.target_modules"),
        ({"target_modules": ["q_proj"]}, "model.lora.target_modules"),
        ({"target_modules": ["linear_fc1", "linear_fc1"]}, "model.lora.target_modules"),
        ({"routed_experts": True}, "model.lora.routed_experts"),  # tiny-dense has no experts
        ({"ranks": 4}, "model.lora.ranks"),
    ],
)
def test_config_errors_name_the_key(section: dict, key: str) -> None:
    from megatron_prefpack.models.presets import preset

    data = {**dataclasses.asdict(preset("tiny-dense")), "lora": section}
    data.pop("name")
    with pytest.raises(ModelConfigError) as info:
        type(preset("tiny-dense")).from_dict(data)
    assert info.value.key == key


def test_config_from_dict_nests_lora() -> None:
    from megatron_prefpack.models.presets import preset

    data = dataclasses.asdict(preset("tiny-moe"))
    data.pop("name")
    data["lora"] = {"rank": 8, "alpha": 16, "routed_experts": True}
    cfg = type(preset("tiny-moe")).from_dict(data)
    assert cfg.lora == LoRAConfig(rank=8, alpha=16, routed_experts=True) and cfg.lora.scale == 2.0


# ------------------------------------------------------------------------------ one process


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("name", ["tiny-dense", "tiny-mla-moe"])
def test_adapted_model_starts_as_base_and_merges(name: str) -> None:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_prefpack.models.lora import adapters_disabled, lora_modules, merge_adapters

    cfg, base = build(name)
    _, model = build(name, lora=lora_for(name))
    modules = lora_modules(model)
    # Per layer: MLA 5 projections / dense 4 linears; MLA-MoE: 2 MLP linears per expert + shared.
    expected = 4 * 2 if name == "tiny-dense" else 3 * 5 + 2 + 2 * (2 + 2 * 8)
    assert len(modules) == expected
    batch = make_batch(make_groups(seed=3, vocab_size=cfg.vocab_size), "packed")
    base_logits = _logits(base, batch)
    assert torch.equal(_logits(model, batch), base_logits), "B = 0 must leave the model unchanged"

    # A: PEFT's kaiming-uniform bound 1/sqrt(in), a different draw per module, the same per build.
    for module in modules:
        bound = 1 / module.base.input_size**0.5
        assert module.lora_A.abs().max() <= bound and module.lora_A.abs().max() > 0.5 * bound
        assert not module.lora_B.any()
    assert not torch.equal(modules[0].lora_A, modules[1].lora_A[:, : modules[0].lora_A.shape[1]])
    _, again = build(name, lora=lora_for(name))
    assert all(torch.equal(a.lora_A, b.lora_A) for a, b in zip(modules, lora_modules(again), strict=True))

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in modules:
            module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=generator))
    adapted = _logits(model, batch)
    assert (adapted - base_logits).abs().max() > 1e-3
    with adapters_disabled([model]):
        assert torch.equal(_logits(model, batch), base_logits)
    assert all(m.enabled for m in modules)

    # The adapter path against an independent formula on one column-parallel linear.
    column = next(m for m in modules if isinstance(m.base, ColumnParallelLinear))
    x = torch.randn(5, 2, column.base.input_size, generator=generator)
    with torch.no_grad():
        out, _ = column(x)
        want = x @ column.base.weight.T + column.scale * (x @ column.lora_A.T @ column.lora_B.T)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)

    merge_adapters([model])
    assert not lora_modules(model)
    assert (_logits(model, batch) - adapted).abs().max() <= 1e-6
    assert list(model.state_dict()) == list(base.state_dict())
    assert model.sharded_state_dict().keys() == base.sharded_state_dict().keys()


@pytest.mark.usefixtures("megatron_single_process")
def test_base_checkpoint_keys_unchanged() -> None:
    """The adapted model's ``sharded_state_dict`` and ``state_dict`` = the base's + adapters."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from tests.distributed import _flatten_values

    _, base = build("tiny-mla-moe")
    _, model = build("tiny-mla-moe", lora=lora_for("tiny-mla-moe"))

    def keys(m: torch.nn.Module) -> set[str]:
        leaves = _flatten_values(m.sharded_state_dict())
        return {leaf.key for leaf in leaves if isinstance(leaf, ShardedTensor | ShardedTensorFactory)}

    adapter_keys = {k for k in keys(model) if k.endswith((".lora_A", ".lora_B"))}
    assert keys(model) - adapter_keys == keys(base)
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1.lora_B" in adapter_keys  # a SwiGLU factory
    plain = {k for k in model.state_dict() if not k.endswith((".lora_A", ".lora_B"))}
    assert plain == set(base.state_dict())
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.endswith((".lora_A", ".lora_B")) for k in missing)


@pytest.mark.usefixtures("megatron_single_process")
def test_freeze_base_leaves_only_adapters_trainable() -> None:
    from megatron_prefpack.models.forward import model_forward
    from megatron_prefpack.models.lora import freeze_base, is_adapter_parameter, lora_modules

    cfg, model = build("tiny-mla-moe", lora=lora_for("tiny-mla-moe"))
    total = sum(p.numel() for p in model.parameters())
    trainable, frozen = freeze_base([model])
    # Each adapter: rank x (in + out) elements.
    expected = sum(4 * (m.base.input_size + m.base.output_size) for m in lora_modules(model))
    assert (trainable, frozen) == (expected, total - expected)
    with torch.no_grad():
        for module in lora_modules(model):
            module.lora_B.fill_(0.01)
    batch = make_batch(make_groups(seed=4, vocab_size=cfg.vocab_size), "packed")
    sum(lp.sum() for lp in response_token_logprobs(model_forward(model, batch), batch).values()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if is_adapter_parameter(n)}
    assert all(model.get_parameter(n).grad.any() for n in with_grad)
    # A reward head or any other parameter can stay trainable through the predicate.
    head = "decoder.final_layernorm.weight"
    trainable2, _ = freeze_base([model], lambda n: is_adapter_parameter(n) or n == head)
    assert trainable2 == expected + model.get_parameter(head).numel()


@pytest.mark.usefixtures("megatron_single_process")
def test_grouped_gemm_routed_experts_refused() -> None:
    from megatron_prefpack.models.lora import apply_lora

    _, model = build("tiny-moe")
    with pytest.raises(ModelConfigError, match=r"lora\.routed_experts"):
        # Simulate a grouped-GEMM expert module: anything but SequentialMLP is refused.
        layer = model.decoder.layers[0]
        layer.mlp.experts = torch.nn.Linear(2, 2)
        apply_lora(model, LoRAConfig(routed_experts=True))


# --------------------------------------------------------------------------------- layouts

LAYOUTS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    # layout: (parallel sizes, TransformerConfig overrides, world size)
    "tp2-sp": ({"tensor_parallel": 2}, {}, 2),
    "tp2-nosp": ({"tensor_parallel": 2}, {"sequence_parallel": False}, 2),
    "ep2": ({"expert_parallel": 2}, {}, 2),
    "pp2": ({"pipeline_parallel": 2}, {}, 2),
    "pp2-uneven": ({"pipeline_parallel": 2}, {"num_layers_in_first_pipeline_stage": 1}, 2),
}
CASES = [
    ("tiny-dense", "tp2-sp"),
    ("tiny-dense", "tp2-nosp"),
    ("tiny-dense", "pp2"),
    ("tiny-moe", "tp2-sp"),  # routed experts split over expert-TP
    ("tiny-mla-moe", "tp2-sp"),
    ("tiny-mla-moe", "ep2"),
    ("tiny-mla-moe", "pp2-uneven"),
]
# (module name, parameter, split axis or None, tp rank, tp size, swiglu, tensor)
Piece = tuple[str, str, int | None, int, int, bool, torch.Tensor]


def _pieces(chunk: torch.nn.Module, grads: bool) -> list[Piece]:
    from megatron_prefpack.models.lora import lora_modules

    pieces = []
    for module in lora_modules(chunk):
        group = module.base.tp_group
        for name in ("lora_A", "lora_B"):
            split = {("lora_B", True): 0, ("lora_A", False): 1}.get((name, module.column))
            value = getattr(module, name)
            value = value.grad if grads else value
            pieces.append(
                (module.key, name, split, group.rank(), group.size(), module.swiglu, value.detach().clone())
            )
    return pieces


def _assemble(pieces: list[Piece]) -> dict[tuple[str, str], torch.Tensor]:
    """Full tensors from every rank's pieces; replicated copies must agree exactly enough."""
    by_key: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    meta: dict[tuple[str, str], tuple[int | None, int, bool]] = {}
    for key, name, split, rank, size, swiglu, value in pieces:
        seen = by_key.setdefault((key, name), {})
        if rank in seen:
            torch.testing.assert_close(value, seen[rank], rtol=1e-6, atol=1e-9, msg=f"{key}.{name} replicas")
        seen[rank] = value
        meta[(key, name)] = (split, size, swiglu)
    full = {}
    for k, shards in by_key.items():
        split, size, swiglu = meta[k]
        assert sorted(shards) == list(range(size)), f"{k}: missing shards"
        parts = [shards[r] for r in range(size)]
        if split is None:
            for part in parts[1:]:
                torch.testing.assert_close(part, parts[0], rtol=1e-6, atol=1e-9, msg=f"{k} TP replicas")
            full[k] = parts[0]
        elif swiglu:  # each rank holds [gate_r; up_r]
            halves = [p.chunk(2, dim=0) for p in parts]
            full[k] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        else:
            full[k] = torch.cat(parts, dim=split)
    return full


def _layout_worker(
    name: str, layout: dict[str, Any], overrides: dict[str, Any], checkpoint_dir: str | None
) -> tuple[float | None, list[Piece], list[Piece], list[Piece]]:
    """One rank: build the adapted model, fill every tensor by key, run forward + backward of
    packed rows through Megatron's schedule; returns (loss on the last stage, initial A pieces,
    gradient pieces, filled adapter pieces). Saves a distributed checkpoint to
    ``checkpoint_dir`` when given."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prefpack.models.forward import model_forward
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(**layout)
    cfg, model = build_adapted(name, overrides)
    initial = [p for p in _pieces(model, grads=False) if p[1] == "lora_A"]
    fill_params_by_key(model, seed=11)
    if checkpoint_dir is not None:
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)
    batch = make_batch(make_groups(seed=6, vocab_size=cfg.vocab_size), "packed")

    def forward_step(data_iterator: Any, chunk: torch.nn.Module):
        output = model_forward(chunk, next(data_iterator))

        def loss_func(logits: torch.Tensor):
            loss = -sum(lp.sum() for lp in response_token_logprobs(logits, batch).values())
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=batch.tokens.shape[1],
        micro_batch_size=batch.tokens.shape[0],
        forward_only=False,
    )
    loss = float(losses[0]["loss"]) if parallel_state.is_pipeline_last_stage() else None
    return loss, initial, _pieces(model, grads=True), _pieces(model, grads=False)


@functools.cache
def _single(name: str) -> tuple[float, dict, dict]:
    ((loss, initial, grads, _),) = run_distributed(_layout_worker, 1, name, {}, {}, None)
    return loss, _assemble(initial), _assemble(grads)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layout"), CASES)
def test_lora_layout_matches_single_process(name: str, layout: str) -> None:
    ref_loss, ref_initial, ref_grads = _single(name)
    sizes, overrides, world = LAYOUTS[layout]
    results = run_distributed(_layout_worker, world, name, sizes, overrides, None)
    losses = [loss for loss, *_ in results if loss is not None]
    assert losses and all(loss == pytest.approx(ref_loss, rel=1e-5) for loss in losses)
    initial = _assemble([p for _, pieces, _, _ in results for p in pieces])
    assert initial.keys() == ref_initial.keys()
    for key, value in initial.items():
        assert torch.equal(value, ref_initial[key]), f"{key}: initial A differs from one process"
    grads = _assemble([p for _, _, pieces, _ in results for p in pieces])
    assert grads.keys() == ref_grads.keys()
    ep = sizes.get("expert_parallel", 1)
    for (key, param), grad in grads.items():
        # Each EP rank routes its own copy of the batch through the experts: their sum.
        scale = ep if ".experts." in key else 1
        ref = ref_grads[(key, param)]
        assert ref.abs().max() > 0, f"{key}.{param}: zero reference gradient"
        torch.testing.assert_close(
            grad / scale, ref, rtol=1e-5, atol=1e-6, msg=lambda m, k=f"{key}.{param}": f"{k}: {m}"
        )


def _load_worker(name: str, checkpoint_dir: str) -> list[Piece]:
    from megatron.core import dist_checkpointing

    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize()
    _, model = build_adapted(name)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint_dir))
    return _pieces(model, grads=False)


@pytest.mark.slow
def test_checkpoint_saved_under_tp2_loads_under_tp1(tmp_path: Path) -> None:
    name = "tiny-mla-moe"
    results = run_distributed(_layout_worker, 2, name, {"tensor_parallel": 2}, {}, str(tmp_path))
    saved = _assemble([p for *_, pieces in results for p in pieces])
    (pieces,) = run_distributed(_load_worker, 1, name, str(tmp_path))
    loaded = _assemble(pieces)
    assert loaded.keys() == saved.keys()
    for key, value in loaded.items():
        assert value.any() and torch.equal(value, saved[key]), f"{key}: loaded adapter differs"
