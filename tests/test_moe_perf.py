"""MoE performance settings (``performance.moe_*``) against the plain layout they replace.

* token dispatchers: ``allgather`` gives the loss, the gradients, the aux loss and the expert-bias
  load counts of ``alltoall`` (gloo, fp32; EP2 and TP2 + SP x EP2), and with either dispatcher a
  pad tail changes none of the routing statistics (it would without the padding mask);
* ``flex`` (DeepEP): Megatron's DeepEP manager turns our router's output back into the same
  top-k experts and weights (CPU, Megatron's own conversion); a GPU run is compared to alltoall;
* grouped GEMM: a checkpoint saved with the grouped experts layout loads into the per-expert
  layout and back, each expert's weights mapped (megatron-core 0.16.1's ``GroupedMLP``, CPU;
  0.19 removed it), and the Hugging Face mapping reads TE's grouped parameter names;
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
