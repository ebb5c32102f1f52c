"""MoE performance settings (``performance.moe_*``) against the plain layout they replace.

* token dispatchers: ``allgather`` gives the loss, the gradients, the aux loss and the expert-bias
  load counts of ``alltoall`` (gloo, fp32; EP2 and TP2 + SP x EP2), and with either dispatcher a
  pad tail changes none of the routing statistics (it would without the padding mask);
* ``flex`` (DeepEP): Megatron's DeepEP manager turns our router's output back into the same
  top-k experts and weights (CPU, Megatron's own conversion); a GPU run is compared to alltoall;
* grouped GEMM: megatron-core 0.16.1's ``GroupedMLP`` (0.19 removed it) shards its checkpoint
  exactly as the per-expert layout does, a checkpoint of either loads into the other with each
  expert's weights in place, and the loaded grouped model gives the same logits and gradients
  in fp32 (CPU; only the CUDA grouped-GEMM kernel is replaced, by a per-expert matmul); the
  Hugging Face mapping reads TE's grouped parameter names (synthetic names over a real model);
  on a GPU, ``TEGroupedMLP`` loads a per-expert checkpoint and exports the same HF tensors;
* ``moe_permute_fusion`` / ``moe_shared_expert_overlap``: one forward/backward on a GPU equals the
  run without them (bf16 tolerance).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from megatron_prefpack.data.groups import TokenizedGroup
from tests.distributed import run_distributed
from tests.test_model_equivalence import (
    _load_balancing_losses,
    _moe_metrics,
    build,
    make_batch,
    make_groups,
    model_config,
    response_token_logprobs,
)

# ----------------------------------------------------------------------------- shared helpers


def _moe_cfg_changes(name: str) -> dict[str, Any]:
    """``build`` changes giving ``name`` an aux loss (so routing statistics reach the loss)."""
    return {"moe": dataclasses.replace(model_config(name).moe, aux_loss_coeff=1e-2)}


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp.router for layer in model.decoder.layers if layer.is_moe_layer]


def _step(model: torch.nn.Module, batch: Any) -> dict[str, Any]:
    """One forward/backward (loss: minus the response log-probs, plus the MoE aux loss through
    Megatron's autoscaler); returns the loss, the per-layer aux losses, the expert-bias load
    counts and the gradients, and leaves the model without gradients or counts."""
    from megatron_prefpack.models.forward import model_forward

    _moe_metrics().clear()
    routers = _routers(model)
    for router in routers:
        if getattr(router, "local_tokens_per_expert", None) is not None:
            router.local_tokens_per_expert.zero_()
    logps = response_token_logprobs(model_forward(model, batch), batch)
    loss = -sum(lp.sum() for lp in logps.values())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    counts = [
        r.local_tokens_per_expert.clone()
        for r in routers
        if getattr(r, "local_tokens_per_expert", None) is not None
    ]
    return {
        "loss": loss.detach(),
        "aux": _load_balancing_losses(),
        "counts": torch.stack(counts) if counts else None,
        "grads": grads,
    }


def _rank_batch(cfg: Any, row_length: int = 64) -> Any:
    """Two preference-packed rows with pad tails, different on every data-parallel rank (so the
    expert ranks exchange uneven per-expert token counts)."""
    from megatron.core import parallel_state

    seed = 20 + parallel_state.get_data_parallel_rank()
    batch = make_batch(make_groups(seed=seed, vocab_size=cfg.vocab_size, num_groups=4), "packed", row_length)
    # The allgather dispatcher needs equal token counts on the expert ranks (fixed rows give it).
    assert batch.tokens.shape == (2, row_length) and (batch.doc_ids == -1).any(), batch.tokens.shape
    return batch


# ----------------------------------------------------------------------------- token dispatchers


def _dispatcher_steps(name: str, layout: dict[str, int], dispatchers: tuple[str, ...]) -> dict[str, Any]:
    """One rank: the same weights and batch through each dispatcher."""
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(**layout)
    results, weights = {}, None
    for dispatcher in dispatchers:
        cfg, model = build(name, {"moe_token_dispatcher_type": dispatcher}, **_moe_cfg_changes(name))
        assert (
            model.decoder.layers[-1]
            .mlp.token_dispatcher.__class__.__name__.lower()
            .startswith(f"moe{dispatcher}")
        ), type(model.decoder.layers[-1].mlp.token_dispatcher)
        if weights is None:
            weights = model.state_dict()
        else:
            model.load_state_dict(weights)
        model.train()
        results[dispatcher] = _step(model, _rank_batch(cfg))
    return results


def _assert_steps_equal(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """fp32: the dispatchers sum an expert's contributions in different orders, nothing else."""
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-6, atol=0), f"{what}: loss {a['loss']} != {b['loss']}"
    assert torch.allclose(a["aux"], b["aux"], rtol=1e-6, atol=0), f"{what}: aux {a['aux']} != {b['aux']}"
    if a["counts"] is not None:
        assert torch.equal(a["counts"], b["counts"]), f"{what}: expert-bias load counts differ"
    assert a["grads"].keys() == b["grads"].keys() and a["grads"], what
    for pname, ref in a["grads"].items():
        rel = ((b["grads"][pname] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-5, f"{what} {pname}: relative grad diff {rel:.3g}"


DISPATCHER_CASES = [
    ("tiny-moe", {"expert_parallel": 2}, 2),
    ("tiny-mla-moe", {"expert_parallel": 2}, 2),
    ("tiny-mla-moe", {"tensor_parallel": 2, "expert_parallel": 2}, 4),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "layout", "world"), DISPATCHER_CASES)
def test_allgather_dispatcher_matches_alltoall(name: str, layout: dict[str, int], world: int) -> None:
    """Loss, aux losses, expert-bias counts and every gradient agree on every rank."""
    for rank, steps in enumerate(
        run_distributed(_dispatcher_steps, world, name, layout, ("alltoall", "allgather"))
    ):
        _assert_steps_equal(steps["alltoall"], steps["allgather"], f"{name} {layout} rank {rank}")


def _pad_statistics(name: str, layout: dict[str, int], dispatcher: str) -> dict[str, torch.Tensor]:
    """One rank: routing statistics of this rank's group alone, with a pad tail, and with the
    pad tail but without the padding mask (what Megatron gets when the mask is not passed)."""
    from megatron.core import parallel_state

    from megatron_prefpack.attention import PrefPackSeqParams
    from megatron_prefpack.models.forward import model_forward
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(**layout)
    cfg, model = build(name, {"moe_token_dispatcher_type": dispatcher}, **_moe_cfg_changes(name))
    # Different tokens on each rank, the same row shape (the allgather dispatcher needs equal
    # token counts on the expert ranks, as training's fixed-length rows give it).
    rng = np.random.default_rng(30 + parallel_state.get_data_parallel_rank())
    prompt, responses = (
        rng.integers(1, cfg.vocab_size, 7),
        [rng.integers(1, cfg.vocab_size, n) for n in (5, 3)],
    )
    group = TokenizedGroup(0, prompt, responses, kind="multi")
    real = make_batch([group], "packed", row_length=group.num_tokens)
    padded = make_batch([group], "packed", row_length=group.num_tokens + 16)
    model.train()
    out = {}
    for label, batch, masked in (("real", real, True), ("padded", padded, True), ("unmasked", padded, False)):
        _moe_metrics().clear()
        for router in _routers(model):
            router.local_tokens_per_expert.zero_()
        if masked:  # (with gradients: Megatron records the aux loss only then)
            logits = model_forward(model, batch)
        else:
            params = PrefPackSeqParams.from_batch(batch)
            logits = model(batch.tokens, batch.position_ids, None, packed_seq_params=params)
        out[f"{label}_logits"] = logits[:, : group.num_tokens].detach().clone()
        out[f"{label}_aux"] = _load_balancing_losses()
        out[f"{label}_counts"] = torch.stack([r.local_tokens_per_expert.clone() for r in _routers(model)])
    out["real_tokens"] = torch.tensor(group.num_tokens)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_pad_tokens_stay_out_of_routing_with_each_dispatcher(dispatcher: str) -> None:
    """EP2, different tokens on each rank: a pad tail leaves the real tokens' outputs, the aux
    losses and the expert-bias load counts as without padding; without the padding mask the
    statistics change (the check can fail)."""
    name = "tiny-mla-moe"
    top_k = model_config(name).moe.top_k
    for rank, out in enumerate(run_distributed(_pad_statistics, 2, name, {"expert_parallel": 2}, dispatcher)):
        what = f"{dispatcher} rank {rank}"
        assert (out["padded_logits"] - out["real_logits"]).abs().max() <= 1e-5, what
        assert torch.allclose(out["padded_aux"], out["real_aux"], rtol=1e-6, atol=0), what
        assert torch.equal(out["padded_counts"], out["real_counts"]), what
        assert out["real_counts"].sum(dim=1).eq(out["real_tokens"] * top_k).all(), what
        assert not torch.allclose(out["unmasked_aux"], out["real_aux"], rtol=1e-6, atol=0), what
        assert not torch.equal(out["unmasked_counts"], out["real_counts"]), what


# ----------------------------------------------------------------------------- grouped GEMM


def _has_legacy_grouped_mlp() -> bool:
    from megatron.core.transformer.moe import experts

    return hasattr(experts, "GroupedMLP")


class _ReferenceGroupedGemm:
    """What the ``grouped_gemm`` CUDA package's ``gmm`` computes, per expert on the CPU:
    rows ``batch_sizes[e]`` of ``a`` times ``b[e]`` (``(E, K, N)``, or ``(E, N, K)`` with
    ``trans_b``). Stands in for the kernel only; Megatron's ``GroupedMLP`` code runs as is."""

    @staticmethod
    def gmm(
        a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False
    ) -> torch.Tensor:
        parts = a.split(batch_sizes.tolist())
        return torch.cat([part @ (w.t() if trans_b else w) for part, w in zip(parts, b, strict=True)])


def _use_reference_grouped_gemm() -> None:
    """Let megatron-core 0.16's legacy ``GroupedMLP`` build and run without the CUDA package."""
    from megatron.core.transformer.moe import grouped_gemm_util

    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    grouped_gemm_util.ops = _ReferenceGroupedGemm


def _sharding_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a distributed checkpoint records about this rank's part of the model:
    per tensor key its global shape and the elements this rank holds (all, and as the main
    replica that writes them); per object key its shard offsets and replica ids."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    tensors: dict[str, list] = {}
    objects = set()
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            held, main = tensors.setdefault(
                item.key,
                [
                    item.global_shape,
                    torch.zeros(item.global_shape, dtype=torch.int32),
                    torch.zeros(item.global_shape, dtype=torch.int32),
                ],
            )[1:]
            # Axes Megatron prepends (layer, expert) are one element long in this shard.
            local = (1,) * (len(item.global_offset) - len(item.local_shape)) + tuple(item.local_shape)
            region = tuple(slice(o, o + n) for o, n in zip(item.global_offset, local, strict=True))
            held[region] += 1
            if not any(item.replica_id if isinstance(item.replica_id, tuple) else (item.replica_id,)):
                main[region] += 1
        elif isinstance(item, ShardedObject):
            objects.add((item.key, tuple(item.global_shape), tuple(item.global_offset), item.replica_id))
    return {"tensors": {k: (tuple(v[0]), v[1], v[2]) for k, v in tensors.items()}, "objects": objects}


def _assert_same_sharding(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["objects"] == b["objects"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key, (shape, held, main) in a["tensors"].items():
        other = b["tensors"][key]
        assert shape == other[0], f"{key}: global shape {shape} != {other[0]}"
        assert torch.equal(held, other[1]), f"{key}: this rank holds different elements"
        assert torch.equal(main, other[2]), f"{key}: this rank writes different elements"


def _expert_pairs(
    sequential: torch.nn.Module, grouped: torch.nn.Module, grads: bool = False
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, per-expert weight, the grouped weight's slice for that expert)`` (or their
    gradients) for every local expert of every MoE layer. ``GroupedMLP.weight1`` is
    ``(H, E_local x 2F)``, each expert's gate and up side by side; ``weight2`` is
    ``(E_local x F, H)``; Megatron's per-expert linears are ``(out, in)``."""

    def value(param: torch.Tensor) -> torch.Tensor:
        return param.grad if grads else param

    pairs = []
    for seq_layer, grp_layer in zip(sequential.decoder.layers, grouped.decoder.layers, strict=True):
        if not seq_layer.is_moe_layer:
            continue
        experts = grp_layer.mlp.experts
        hidden = experts.config.hidden_size
        fc1 = value(experts.weight1).view(experts.num_local_experts, hidden, -1)
        fc2 = value(experts.weight2).view(experts.num_local_experts, -1, hidden)
        for e, expert in enumerate(seq_layer.mlp.experts.local_experts):
            where = f"layer {seq_layer.layer_number} expert {e}"
            pairs.append((f"{where} fc1", value(expert.linear_fc1.weight), fc1[e].t()))
            pairs.append((f"{where} fc2", value(expert.linear_fc2.weight), fc2[e].t()))
    return pairs


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """New values everywhere, so a load that skipped a tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _grouped_interchange(
    name: str, layout: dict[str, int], seq_dir: str, grouped_dir: str
) -> dict[str, float]:
    """One rank: sequential -> checkpoint -> grouped, and grouped -> checkpoint -> sequential;
    the same sharding metadata; equal weights per expert; equal logits and expert gradients."""
    from megatron.core import dist_checkpointing

    from megatron_prefpack.models.forward import model_forward
    from megatron_prefpack.platform import distributed as dist_platform

    _use_reference_grouped_gemm()
    dist_platform.initialize(**layout)
    cfg, sequential = build(name)
    _, grouped = build(name, {"moe_grouped_gemm": True})
    experts = grouped.decoder.layers[-1].mlp.experts
    assert type(experts).__name__ == "GroupedMLP"
    # GroupedMLP.forward asserts bf16 for the CUDA kernel's sake; with the per-expert reference
    # GEMM it runs fp32 (nothing else in the forward reads the flag), so the check is exact.
    experts.config.bf16 = True
    _assert_same_sharding(_sharding_metadata(sequential), _sharding_metadata(grouped))

    def load(model: torch.nn.Module, directory: str) -> None:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))

    def assert_mapped(what: str) -> None:
        for pname, expert, grouped_slice in _expert_pairs(sequential, grouped):
            assert torch.equal(expert, grouped_slice), f"{what}: {pname}"
        seq_rest = {n: p for n, p in sequential.named_parameters() if ".experts." not in n}
        grp_rest = {n: p for n, p in grouped.named_parameters() if ".experts." not in n}
        assert seq_rest.keys() == grp_rest.keys()
        for pname, param in seq_rest.items():
            assert torch.equal(param, grp_rest[pname]), f"{what}: {pname}"

    # sequential -> grouped
    _randomize(grouped, seed=7)
    dist_checkpointing.save(sequential.sharded_state_dict(), seq_dir)
    load(grouped, seq_dir)
    assert_mapped("sequential checkpoint loaded as grouped")

    # The loaded grouped experts compute what the per-expert ones do (Megatron's GroupedMLP
    # forward, the grouped GEMM done per expert on the CPU), also for the gradients.
    batch = _rank_batch(cfg)
    logits = []
    for model in (sequential, grouped):
        model.train()
        out = model_forward(model, batch)
        out.float().square().mean().backward()
        logits.append(out.detach().float())
    diffs = {"logits": ((logits[1] - logits[0]).abs().max() / logits[0].abs().max()).item()}
    diffs["expert_grads"] = max(
        ((g.float() - ref.float()).norm() / ref.float().norm()).item()
        for _, ref, g in _expert_pairs(sequential, grouped, grads=True)
    )

    # grouped -> sequential
    _randomize(grouped, seed=8)
    _randomize(sequential, seed=9)
    dist_checkpointing.save(grouped.sharded_state_dict(), grouped_dir)
    load(sequential, grouped_dir)
    assert_mapped("grouped checkpoint loaded as sequential")
    return diffs


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_legacy_grouped_mlp(),
    reason="megatron-core >= 0.19 has no legacy GroupedMLP; TEGroupedMLP needs Transformer Engine on a GPU",
)
@pytest.mark.parametrize("layout", [{"expert_parallel": 2}, {"tensor_parallel": 2}], ids=["ep2", "tp2-sp"])
def test_grouped_and_sequential_experts_checkpoints_interchange(
    tmp_path: Any, layout: dict[str, int]
) -> None:
    """megatron-core 0.16.1's grouped experts (``moe_grouped_gemm`` without Transformer Engine:
    ``GroupedMLP``) against the per-expert ``SequentialMLP``, tiny-mla-moe: the same
    checkpoint keys, global shapes and shards per rank; a checkpoint of either loads into the
    other with every expert's fc1 ``[gate; up]`` and fc2 in place; the loaded grouped model
    gives the same logits and expert gradients (fp32)."""
    seq_dir, grouped_dir = tmp_path / "sequential", tmp_path / "grouped"
    seq_dir.mkdir()
    grouped_dir.mkdir()
    for rank, diffs in enumerate(
        run_distributed(_grouped_interchange, 2, "tiny-mla-moe", layout, str(seq_dir), str(grouped_dir))
    ):
        assert diffs["logits"] <= 1e-6, f"rank {rank}: {diffs}"
        assert diffs["expert_grads"] <= 1e-5, f"rank {rank}: {diffs}"


def _grouped_view(model: torch.nn.Module) -> Any:
    """``model`` (per-expert experts) as the HF tools see a grouped-GEMM model: the same
    parameters under ``TEGroupedMLP``'s names (local expert ``j``'s ``linear_fc1.weight`` is
    ``experts.linear_fc1.weight{j}``), plus the ``_extra_state`` tensors Transformer Engine
    keeps per grouped linear. Only the names are synthetic; the tensors are the model's."""
    import re
    import types

    names: dict[str, Any] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        match = re.fullmatch(
            r"(.+\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|_extra_state)", name
        )
        if match is None:
            names[name] = tensor
        elif match[4] == "weight":
            names[f"{match[1]}.{match[3]}.weight{match[2]}"] = tensor
        else:
            names[f"{match[1]}.{match[3]}._extra_state"] = torch.empty(0, dtype=torch.uint8)
    assert any(".experts.linear_fc1.weight" in n for n in names) and not any(
        "local_experts" in n for n in names
    )
    return types.SimpleNamespace(decoder=model.decoder, state_dict=lambda keep_vars=False: names)


class _Tensors(dict):
    """A dict of HF tensors read like ``SafetensorsCheckpoint`` (``in``, ``read``)."""

    def read(self, name: str) -> torch.Tensor:
        return self[name].float()


@pytest.mark.usefixtures("megatron_single_process")
def test_hf_mapping_reads_grouped_expert_names() -> None:
    """Export from a grouped-GEMM model gives the per-expert model's HF tensors, name for name;
    import into it fills every expert from the right HF tensors (``[gate; up]`` included)."""
    from megatron_prefpack.models.hf import ARCHITECTURES, fill_model, hf_tensors

    arch = ARCHITECTURES["axk1"]  # tiny-mla-moe is A.X K1 in miniature
    cfg, source = build("tiny-mla-moe")
    _randomize(source, seed=3)
    exported = dict(hf_tensors(source, arch, cfg))
    grouped_export = dict(hf_tensors(_grouped_view(source), arch, cfg))
    assert exported.keys() == grouped_export.keys()
    assert any(".mlp.experts.7.up_proj.weight" in n for n in exported)
    for name, tensor in exported.items():
        assert torch.equal(tensor, grouped_export[name]), name

    _, target = build("tiny-mla-moe")
    _randomize(target, seed=4)
    report = fill_model(_grouped_view(target), arch, cfg, _Tensors(exported))
    assert report.filled == len([n for n, t in source.state_dict().items() if isinstance(t, torch.Tensor)])
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- flex (DeepEP)


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("name", ["tiny-moe", "tiny-qwen3-moe", "tiny-mla-moe"])
def test_deepep_metadata_recovers_our_routing(name: str) -> None:
    """The flex dispatcher never reads the routing map itself: Megatron expands ``(probs,
    routing_map)`` over the TP x EP ranks and DeepEP's manager takes the ``top_k`` largest
    probabilities as the experts. Run on our router's output (pads included) with Megatron's own
    two steps (TP2 x EP2), that gives back exactly the routed experts and weights: every token,
    pad or not, has ``top_k`` experts of positive weight, the rest weight 0."""
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher, _DeepepManager

    from megatron_prefpack.models.moe import PadAwareTopKRouter

    cfg, model = build(name)
    router = _routers(model)[0]
    assert isinstance(router, PadAwareTopKRouter)
    experts, top_k = cfg.moe.num_experts, cfg.moe.top_k
    hidden = torch.randn(24, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    pads = torch.zeros(24, 2, dtype=torch.bool)
    pads[17:, 0] = pads[20:, 1] = True
    model.eval()
    with torch.no_grad():
        probs, routing_map = router(hidden, pads)
    assert routing_map.sum(dim=1).eq(top_k).all() and (probs[routing_map] > 0).all()
    assert probs[~routing_map].eq(0).all()

    tp, ep = 2, 2
    flex = _namespace(tp_size=tp, ep_size=ep, num_local_experts=experts // ep)
    wide_map, wide_probs = MoEFlexTokenDispatcher._initialize_metadata(flex, routing_map, probs)
    deepep = _namespace(num_experts=tp * experts, router_topk=tp * top_k, capacity_factor=None)
    _DeepepManager.setup_metadata(deepep, wide_map, wide_probs)
    recovered = torch.zeros(routing_map.shape[0], tp * experts, dtype=torch.bool)
    recovered.scatter_(1, deepep.token_indices, True)
    assert torch.equal(recovered, wide_map.reshape(routing_map.shape[0], -1))
    assert torch.equal(
        deepep.token_probs, wide_probs.reshape(routing_map.shape[0], -1).gather(1, deepep.token_indices)
    )


def _namespace(**fields: Any) -> Any:
    """The attributes a Megatron method reads from ``self``, for calling it without its module."""
    import types

    return types.SimpleNamespace(**fields)


# ----------------------------------------------------------------------------- GPU-only settings


def _transformer_engine() -> bool:
    from megatron_prefpack.platform.features import has_transformer_engine

    return has_transformer_engine()


def _bf16_steps(name: str, layout: dict[str, int], variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One rank: the same bf16 weights and batch through each TransformerConfig variant."""
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(**layout)
    results, weights = {}, None
    for label, overrides in variants.items():
        cfg, model = build(name, overrides, params_dtype="bfloat16", **_moe_cfg_changes(name))
        if weights is None:
            weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        model.load_state_dict(weights, strict=False)
        model.train()
        step = _step(model, _rank_batch(cfg).to(torch.cuda.current_device()))
        results[label] = {
            k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in step.items() if k != "grads"
        }
        results[label]["grads"] = {k: v.float().cpu() for k, v in step["grads"].items()}
    return results


def _assert_bf16_close(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert torch.allclose(a["loss"].float(), b["loss"].float(), rtol=2e-2), (
        f"{what}: {a['loss']} != {b['loss']}"
    )
    assert a["grads"].keys() == b["grads"].keys() and a["grads"], what
    for pname, ref in a["grads"].items():
        rel = ((b["grads"][pname] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel <= 5e-2, f"{what} {pname}: relative grad diff {rel:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting",
    [
        pytest.param({"moe_permute_fusion": True}, id="moe_permute_fusion"),
        pytest.param({"moe_shared_expert_overlap": True}, id="moe_shared_expert_overlap"),
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_moe_setting_matches_plain_run(setting: dict[str, Any]) -> None:
    """tiny-mla-moe (shared expert, post-MoE norm, expert bias) in bf16 on one GPU: one
    forward/backward with the setting equals the plain alltoall run within bf16 rounding."""
    if "moe_permute_fusion" in setting and not _transformer_engine():
        pytest.skip("moe_permute_fusion needs Transformer Engine")
    (steps,) = run_distributed(_bf16_steps, 1, "tiny-mla-moe", {}, {"plain": {}, "setting": setting})
    _assert_bf16_close(steps["plain"], steps["setting"], str(setting))


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="flex needs TP x EP > 1: two GPUs")
def test_gpu_flex_dispatcher_matches_alltoall() -> None:
    """DeepEP (``flex``) against ``alltoall``, EP2 on two GPUs, bf16."""
    from megatron_prefpack.platform.features import installed

    if not installed("deep_ep"):
        pytest.skip("flex needs DeepEP (deep_ep)")
    variants = {
        "alltoall": {},
        "flex": {"moe_token_dispatcher_type": "flex", "moe_flex_dispatcher_backend": "deepep"},
    }
    for rank, steps in enumerate(
        run_distributed(_bf16_steps, 2, "tiny-mla-moe", {"expert_parallel": 2}, variants)
    ):
        _assert_bf16_close(steps["alltoall"], steps["flex"], f"flex rank {rank}")


def _te_grouped_interchange(name: str, checkpoint_dir: str) -> dict[str, Any]:
    """One GPU: a per-expert checkpoint (what ``convert_hf_checkpoint`` writes) loaded into
    ``TEGroupedMLP``; both models' steps, and whether the HF export tensors agree."""
    from megatron.core import dist_checkpointing

    from megatron_prefpack.models.hf import ARCHITECTURES, hf_tensors
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize()
    cfg, sequential = build(name, params_dtype="bfloat16", **_moe_cfg_changes(name))
    _, grouped = build(name, {"moe_grouped_gemm": True}, params_dtype="bfloat16", **_moe_cfg_changes(name))
    assert type(grouped.decoder.layers[-1].mlp.experts).__name__ == "TEGroupedMLP"
    dist_checkpointing.save(sequential.sharded_state_dict(), checkpoint_dir)
    grouped.load_state_dict(dist_checkpointing.load(grouped.sharded_state_dict(), checkpoint_dir))
    arch = ARCHITECTURES["axk1"]
    seq_hf, grp_hf = dict(hf_tensors(sequential, arch, cfg)), dict(hf_tensors(grouped, arch, cfg))
    same_hf = seq_hf.keys() == grp_hf.keys() and all(torch.equal(v, grp_hf[k]) for k, v in seq_hf.items())
    out: dict[str, Any] = {"same_hf": same_hf}
    for label, model in (("sequential", sequential), ("grouped", grouped)):
        model.train()
        step = _step(model, _rank_batch(cfg).to(torch.cuda.current_device()))
        out[label] = {"loss": step["loss"].float().cpu(), "aux": step["aux"].cpu()}
    return out


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_te_grouped_experts_load_a_per_expert_checkpoint(tmp_path: Any) -> None:
    """The grouped-GEMM layer the training uses on a GPU (``TEGroupedMLP``) loads a checkpoint
    of per-expert weights, exports the same HF tensors, and gives the same loss (bf16)."""
    if not _transformer_engine():
        pytest.skip("moe_grouped_gemm needs Transformer Engine")
    (out,) = run_distributed(_te_grouped_interchange, 1, "tiny-mla-moe", str(tmp_path))
    assert out["same_hf"]
    assert torch.allclose(out["sequential"]["loss"], out["grouped"]["loss"], rtol=2e-2)
