"""A tiny Megatron GPTModel (local spec, fp32, CPU/gloo) gives the same numbers in every layout.

Each layout runs in fresh rank processes (``run_distributed``) and is compared with one process
running the same model on the same data: the loss must match to 1e-5 relative, and the gradients
of selected parameters, reassembled from every rank's shard by their global keys, too. Weights are
set with ``fill_params_by_key`` so they are identical in every layout (Megatron's own init draws
expert and later-stage weights from different RNG positions per layout).

The data-parallel test trains two Adam steps through Megatron's DDP, distributed optimizer,
``OptimizerParamScheduler`` and ``get_forward_backward_func`` on two ranks and compares the
updated weights with one process training on the concatenated batch.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from megatron_prefpack.platform.cpu import check_cpu_config
from tests.distributed import fill_params_by_key, run_distributed

pytestmark = pytest.mark.slow

VOCAB = 128
SEQ = 16
HIDDEN = 32
GRAD_KEYS = (
    "embedding.word_embeddings.weight",
    "decoder.layers.self_attention.linear_qkv.weight",
    "decoder.layers.self_attention.linear_proj.weight",
    "decoder.layers.mlp.linear_fc1.weight",
    "decoder.layers.mlp.experts.experts.linear_fc1.weight",
    "decoder.layers.mlp.experts.experts.linear_fc2.weight",
    "output_layer.weight",
)
# Slices of global tensors held by one rank: {key: (global_shape, [(global_slice, value)])}.
Shards = dict[str, tuple[tuple[int, ...], list[tuple[tuple[Any, ...], torch.Tensor]]]]


def _build_gpt(moe: bool, vp_stage: int | None = None) -> Any:
    """4-layer GPT (chunk ``vp_stage`` under virtual pipelining) on the current parallel state.

    Sequence parallel whenever TP > 1; weights from ``fill_params_by_key``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    options: dict[str, Any] = {}
    if moe:
        options = {
            "num_moe_experts": 4,
            "moe_router_topk": 2,
            "moe_ffn_hidden_size": 32,
            "moe_token_dispatcher_type": "alltoall",
            "moe_grouped_gemm": False,
        }
    config = TransformerConfig(
        num_layers=4,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=64,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        batch_p2p_comm=False,
        **options,
    )
    check_cpu_config(config)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=4 if moe else None, moe_grouped_gemm=False
        ),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        vp_stage=vp_stage,
    )
    fill_params_by_key(model, seed=7)
    return model


def _batch(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, VOCAB, (rows, SEQ), generator=generator),
        "labels": torch.randint(0, VOCAB, (rows, SEQ), generator=generator),
        "position_ids": torch.arange(SEQ).expand(rows, SEQ),
    }


def _mean_loss(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = per_token.float().mean()
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    batch = next(data_iterator)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token, _mean_loss


def _run_schedule(chunks: list[Any], batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Forward + backward of ``batches`` (one microbatch each) through this rank's model chunks.

    Returns the microbatch losses on the last pipeline stage, else [].
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows = batches[0]["tokens"].shape[0]
    iterators = [iter(batches) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=rows,
        forward_only=False,
    )
    return [float(item["loss"]) for item in losses]


def _shards(model: Any, keys: tuple[str, ...] | None, grads: bool) -> Shards:
    """This rank's slices of the parameters (or their ``.grad``) named by ``keys`` (None: all)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from tests.distributed import _flatten_values

    shards: Shards = {}
    for tensor in _flatten_values(model.sharded_state_dict()):
        if isinstance(tensor, ShardedTensor) and (keys is None or tensor.key in keys):
            value = tensor.data.grad if grads else tensor.data
            shards.setdefault(tensor.key, (tuple(tensor.global_shape), []))[1].append(
                (tensor.global_slice(), value.detach().clone())
            )
    return shards


def _assemble(per_rank: list[Shards]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's slices; replicas of a slice must agree."""
    full: dict[str, torch.Tensor] = {}
    for shards in per_rank:
        for key, (shape, pieces) in shards.items():
            target = full.setdefault(key, torch.full(shape, float("nan")))
            for where, value in pieces:
                if not target[where].isnan().any():
                    torch.testing.assert_close(value, target[where], msg=lambda m, key=key: f"{key}: {m}")
                target[where] = value
    return full


def _layout_worker(tp: int, pp: int, ep: int, vpp: int | None, moe: bool) -> tuple[list[float], Shards]:
    """One rank: forward + backward of four shared microbatches; returns (losses, grad shards).

    Four, not two: with ``batch_p2p_comm=True`` over gloo the interleaved schedule swaps
    activations from the third microbatch on, which this test must be able to see.
    """
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(
        tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, virtual_pipeline_parallel=vpp
    )
    chunks = [_build_gpt(moe, vp_stage) for vp_stage in range(vpp)] if vpp else [_build_gpt(moe)]
    losses = _run_schedule(chunks, [_batch(rows=2, seed=seed) for seed in range(4)])
    shards: Shards = {}
    for chunk in chunks:
        for key, (shape, pieces) in _shards(chunk, GRAD_KEYS, grads=True).items():
            shards.setdefault(key, (shape, []))[1].extend(pieces)
    return losses, shards


@functools.cache
def _reference(moe: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process losses and full gradients (cached per pytest process)."""
    ((losses, shards),) = run_distributed(_layout_worker, 1, 1, 1, 1, None, moe)
    return losses, _assemble([shards])


LAYOUTS = [
    pytest.param(2, 1, 1, None, False, id="dense-tp2-sp"),
    pytest.param(1, 2, 1, None, False, id="dense-pp2"),
    pytest.param(1, 2, 1, 2, False, id="dense-pp2-vpp2"),
    pytest.param(2, 1, 1, None, True, id="moe-tp2-sp"),
    pytest.param(1, 1, 2, None, True, id="moe-ep2"),
    pytest.param(1, 2, 1, None, True, id="moe-pp2"),
    pytest.param(2, 1, 2, None, True, id="moe-tp2-ep2"),
]


@pytest.mark.parametrize(("tp", "pp", "ep", "vpp", "moe"), LAYOUTS)
def test_layout_matches_single_process(tp: int, pp: int, ep: int, vpp: int | None, moe: bool) -> None:
    world_size = max(tp * pp, tp * ep)
    ref_losses, ref_grads = _reference(moe)
    results = run_distributed(_layout_worker, world_size, tp, pp, ep, vpp, moe)

    last_stage_losses = [losses for losses, _ in results if losses]
    assert len(last_stage_losses) == world_size // pp  # every last-stage rank reports the losses
    for losses in last_stage_losses:
        assert losses == pytest.approx(ref_losses, rel=1e-5)

    grads = _assemble([shards for _, shards in results])
    assert set(grads) == set(ref_grads)
    for key, grad in grads.items():
        assert not grad.isnan().any(), f"{key}: some shard missing"
        # Each of the ``ep`` ranks routes its own copy of the batch through the shared experts, so
        # an expert gradient is the sum over them (DDP's averaging comes later).
        scale = ep if ".experts." in key else 1
        torch.testing.assert_close(
            grad / scale, ref_grads[key], rtol=1e-5, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}"
        )


def _train_worker(tp: int, distributed_optimizer: bool, steps: int) -> tuple[Shards, Shards, list[float]]:
    """Train ``steps`` Adam steps; data-parallel ranks split a 4-row batch.

    Returns this rank's (initial weights, final weights) slices and each step's gradient norm.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(tensor_parallel=tp)
    module = _build_gpt(moe=False)
    module.config.finalize_model_grads_func = finalize_model_grads
    model = DistributedDataParallel(
        module.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
        ),
        module,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            min_lr=1e-4,
            # Adam's update g / (|g| + eps) turns float rounding of near-zero gradients into
            # lr-sized differences; eps = 1e-4 bounds that amplification by lr / eps.
            adam_eps=1e-4,
            clip_grad=1.0,
            use_distributed_optimizer=distributed_optimizer,
            params_dtype=torch.float32,
        ),
        [model],
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=1e-3,
        max_lr=1e-3,
        min_lr=1e-4,
        lr_warmup_steps=0,
        lr_decay_steps=steps,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    initial = _shards(module, None, grads=False)
    rows = 4 // parallel_state.get_data_parallel_world_size()
    first = parallel_state.get_data_parallel_rank() * rows
    grad_norms = []
    for step in range(steps):
        mine = {name: value[first : first + rows] for name, value in _batch(rows=4, seed=step).items()}
        model.zero_grad_buffer()
        optimizer.zero_grad()
        _run_schedule([model], [mine])
        succeeded, grad_norm, _ = optimizer.step()
        assert succeeded
        grad_norms.append(grad_norm)
        scheduler.step(increment=1)
    return initial, _shards(module, None, grads=False), grad_norms


TRAIN_LAYOUTS = [
    pytest.param(2, 1, False, id="dp2-adam"),
    pytest.param(2, 1, True, id="dp2-distributed-adam"),
    pytest.param(2, 2, True, id="tp2-sp-distributed-adam"),
]


@pytest.mark.parametrize(("world_size", "tp", "distributed_optimizer"), TRAIN_LAYOUTS)
def test_training_matches_single_process(world_size: int, tp: int, distributed_optimizer: bool) -> None:
    """DDP + Megatron optimizer + scheduler: same weights as one process on the whole batch."""
    ((initial, single, single_norms),) = run_distributed(_train_worker, 1, 1, distributed_optimizer, 2)
    initial_full, single_full = _assemble([initial]), _assemble([single])
    for key, value in single_full.items():  # every weight moved: the comparison is not vacuous
        assert not torch.equal(value, initial_full[key]), key

    ranks = run_distributed(_train_worker, world_size, tp, distributed_optimizer, 2)
    for _, _, grad_norms in ranks:
        # Adam's update hardly depends on the gradient scale; the norm checks the DP averaging.
        assert grad_norms == pytest.approx(single_norms, rel=1e-5)
    trained = _assemble([final for _, final, _ in ranks])
    assert set(trained) == set(single_full)
    for key, value in trained.items():
        torch.testing.assert_close(
            value, single_full[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
        )
