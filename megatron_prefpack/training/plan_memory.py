"""Per-rank memory of a training layout, for ``prefpack plan``, without a GPU or a cluster.

**Static bytes (exact).** For one global rank of the layout, :func:`rank_static` builds that
rank's own model chunks with the trainer's code (``training.model_setup``: Megatron's
``GPTModel`` through ``build_chunks``, ``Float16Module`` + Megatron ``DistributedDataParallel``
through ``wrap_for_training``) under ``torch.device("meta")``, in this process, with a fake
process group (``torch.testing``'s ``FakeStore``, backend ``"fake"``: no communication) of the
layout's world size and Megatron's ``initialize_model_parallel`` for the layout. Nothing is
allocated; the counts are those of the real objects:

* ``param_bytes``: the storage of the parameters: the DDP parameter buffers under the
  distributed optimizer (parameters are views into them, padded as Megatron pads), else
  ``numel * element_size`` of every parameter;
* ``grad_bytes``: Megatron's gradient buffers (``grad_reduce_in_fp32``, bucket and parameter
  padding as Megatron lays them out);
LoRA (``model.lora``): the build freezes the base as the trainer does (``build_chunks``), so
the gradient buffers and the optimizer hold the adapters only, and the frozen base weights
count in ``param_bytes`` alone.

* ``optimizer_bytes``: Adam's two moments (``exp_avg_dtype`` / ``exp_avg_sq_dtype``) plus an
  fp32 master copy when the parameters are 16-bit, for the elements this rank updates: all of
  its parameters, or under the distributed optimizer its shard of every bucket (Megatron's
  rule: bucket ``k`` of ``n`` elements is cut into ``n / D`` contiguous pieces over the ``D``
  ranks of the buffer's data-parallel group, DP x CP for dense parameters, expert-DP for
  experts), less the CPU-offloaded fraction.

The build runs with CUDA hidden from Megatron (the CPU layer spec, ``use_cpu_initialization``,
no weight initialisation; ``platform.cpu.enable_cpu_megatron`` is applied to this process) and
with the settings that only choose GPU kernels reset (``moe_grouped_gemm``, FP8, TP overlap,
fused permutation, the MoE dispatcher): they do not change which parameters exist. On a GPU the
Transformer Engine spec holds the same parameters (layer norms fused into the next linear);
only Megatron's 64-element padding of each parameter start can differ there.

**Activations (approximate).** Bytes saved for backward per micro-batch, layer by layer, in the
style of Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer
models"), adapted to what Megatron-Core saves here (no dropout, flash-style attention that
keeps ``q, k, v``, its output and an fp32 log-sum-exp instead of the ``a s^2`` scores, unfused
RoPE, SwiGLU; the ``reference`` attention backend keeps the fp32 probabilities, ``4 T s a / t``
bytes more). With ``T = seq_len * micro_batch / CP`` tokens per rank, ``T_s = T / TP`` under
sequence parallelism (else ``T``), ``t`` = TP, ``e`` = bytes of the activation dtype:

* every layer: ``2 T_s h`` (the layer-norm inputs) ``+ 2 T_s h`` (their outputs, the next
  linear's input, kept as the sequence shard under SP);
* attention: ``T d (a + 2g) / t`` (the QKV projection) ``+ 2 T d (a + g) / t`` (RoPE: the
  rotated halves and the results) ``+ T d a / t`` (output) ``+ 4 T a / t`` bytes (log-sum-exp);
  MLA: the latents ``T (r_q + r_kv + d_r)`` twice (down projection and its norm) ``+ T a
  (2 (d_n + d_r) + d_n + 2 d_v) / t`` (up projections and the q/k/v handed to the kernel)
  ``+ 2 T a d_r / t`` (RoPE) ``+ T a d_v / t + 4 T a / t`` bytes;
* dense MLP: ``T (2 f + f + f) / t`` (fc1 output, SiLU output, product) for SwiGLU, ``2 T f / t``
  otherwise;
* MoE: router logits and probabilities ``2 * 4 T_s E`` bytes, the top-k expanded tokens
  ``k T_s h`` (permuted, before the all-to-all) ``+ k T h`` (expert input after the TP
  all-gather; expert TP = TP) ``+ k T 4 f_e / t`` (expert MLPs) ``+ k T_s h`` (expert outputs
  weighted back), the shared expert ``T 4 f_s / t``, the post-MoE norm ``T_s h``;
* last stage: final norm ``2 T_s h`` and the vocab-parallel loss's fp32 softmax ``4 T V / t``
  bytes; first stage: the token ids.

Recompute (``performance.recompute_*``): ``full`` keeps ``T_s h`` per recomputed chunk of
layers (``uniform``: chunks of ``recompute_num_layers``; ``block``: the first
``recompute_num_layers`` layers of each stage, the rest keep everything) and rebuilds one
chunk's activations in backward (added once); ``selective`` drops the terms of the named
modules (``core_attn``: the log-sum-exp; ``mlp`` / ``moe`` / ``shared_experts`` / ``moe_act``
/ ``layernorm`` / ``mla_up_proj``: their internals).

The peak of a stage multiplies by the micro-batches in flight under Megatron's 1F1B schedule:
``min(PP - stage, m)`` (``m`` micro-batches per step); interleaved with ``V`` virtual stages,
``min((PP - stage - 1) * 2 + (V - 1) * PP + 1, m V)`` model chunks of ``1/V`` of the stage.
Approximate: the backward pass's transient gradients (taken as one more layer's worth), MoE
load imbalance (tokens per expert rank taken as the average), allocator fragmentation (the
planner's headroom), the TE spec's different saved tensors (e.g. fused layer-norm outputs,
FP8 copies), communication buffers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_prefpack.models.config import ModelConfig, torch_dtype
from megatron_prefpack.training.config import TrainConfig

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class StageShape:
    """What a pipeline stage holds: per model chunk, the 0-based global indices of its layers;
    whether it holds the embedding (first stage) and the output layer and loss (last stage)."""

    chunks: tuple[tuple[int, ...], ...]
    embedding: bool
    output: bool

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(i for chunk in self.chunks for i in chunk)


@dataclass(frozen=True)
class StaticBytes:
    """Exact static memory of one rank (see the module docstring)."""

    rank: int
    stage: int
    shape: StageShape
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int


# ----------------------------------------------------------------------------- meta-device build


@contextlib.contextmanager
def _cuda_hidden() -> Iterator[None]:
    """Megatron sees no CUDA while the planner builds (CPU spec, no ``.cuda()``, no CUDA init);
    its allocations by ``torch.cuda.current_device()`` (DDP buffers) land on the meta device."""
    from megatron_prefpack.platform.cpu import enable_cpu_megatron

    is_available, current_device = torch.cuda.is_available, torch.cuda.current_device
    megatron_log = logging.getLogger("megatron.core")
    level = megatron_log.level
    torch.cuda.is_available = lambda: False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Megatron's notes on missing TE/Apex, per build
            megatron_log.setLevel(logging.ERROR)  # and its per-layer "Unknown MLP type"
            enable_cpu_megatron()
            torch.cuda.current_device = lambda: torch.device("meta")
            yield
    finally:
        torch.cuda.is_available = is_available
        torch.cuda.current_device = current_device
        megatron_log.setLevel(level)


@contextlib.contextmanager
def fake_layout(cfg: TrainConfig, world_size: int, rank: int) -> Iterator[None]:
    """Megatron's parallel state for ``cfg.parallel`` as seen by global ``rank`` of ``world_size``,
    on a fake process group (no communication). Torn down on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner needs a process without torch.distributed initialised")
    par = cfg.parallel
    dist.init_process_group(backend="fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor,
            pipeline_model_parallel_size=par.pipeline,
            virtual_pipeline_model_parallel_size=par.virtual_pipeline,
            context_parallel_size=par.context,
            expert_model_parallel_size=par.expert,
            expert_tensor_parallel_size=par.tensor,
            create_gloo_process_groups=False,
        )
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def buildable(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the settings that only pick GPU kernels reset to what builds on the CPU
    (they do not change the parameters); the layout, recompute and DDP settings are kept."""
    from megatron_prefpack.training.config import PerformanceConfig

    default = PerformanceConfig()
    perf = dataclasses.replace(
        cfg.performance,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_token_dispatcher_type=default.moe_token_dispatcher_type,
        moe_shared_expert_overlap=False,
        fp8=None,
        tp_comm_overlap=False,
    )
    return dataclasses.replace(cfg, performance=perf)


def _build_wrapped(cfg: TrainConfig, model_cfg: ModelConfig) -> tuple[list[torch.nn.Module], Any]:
    """This rank's chunks, DDP-wrapped, on the meta device (parallel state initialised)."""
    from megatron_prefpack.training import model_setup

    tcfg = model_setup.transformer_config(buildable(cfg), model_cfg)
    tcfg.use_cpu_initialization = True
    tcfg.perform_initialization = False
    with torch.device("meta"):
        chunks = model_setup.build_chunks(model_cfg, tcfg)
        wrapped = model_setup.wrap_for_training(chunks, tcfg, cfg.parallel.distributed_optimizer, cfg.ddp)
    return wrapped, tcfg


def _stage_shape(wrapped: list[torch.nn.Module]) -> StageShape:
    from megatron.core import parallel_state as ps

    chunks = []
    for ddp in wrapped:
        gpt = ddp.module.module if hasattr(ddp.module, "module") else ddp.module
        chunks.append(tuple(layer.layer_number - 1 for layer in gpt.decoder.layers))
    return StageShape(
        chunks=tuple(chunks),
        embedding=ps.is_pipeline_first_stage(ignore_virtual=True),
        output=ps.is_pipeline_last_stage(ignore_virtual=True),
    )


def shard_elements(buffer: Any, shard: int) -> int:
    """Parameter elements that data-parallel ``shard`` of ``buffer`` updates under Megatron's
    distributed optimizer: every bucket is cut into equal contiguous pieces, one per rank of
    the buffer's data-parallel group, and a rank updates the parameter elements in its piece."""
    size = buffer.data_parallel_group.size()
    owned = 0
    for index, bucket in enumerate(buffer.buckets):
        piece = bucket.grad_data.numel() // size
        start = bucket.offset + shard * piece
        end = start + piece
        for first, last, bucket_id in buffer.param_index_map.values():
            if bucket_id == index:
                owned += max(0, min(last, end) - max(first, start))
    return owned


def optimizer_bytes_per_element(cfg: TrainConfig, model_cfg: ModelConfig) -> int:
    """Optimizer bytes per updated element: Adam's two moments, plus an fp32 master copy when
    the parameters are 16-bit (Megatron keeps fp32 parameters themselves as the master)."""
    opt = cfg.optimizer
    moments = _DTYPE_BYTES[opt.exp_avg_dtype] + _DTYPE_BYTES[opt.exp_avg_sq_dtype]
    master = 4 if _DTYPE_BYTES[model_cfg.params_dtype] < 4 else 0
    return moments + master


def rank_static(cfg: TrainConfig, model_cfg: ModelConfig, world_size: int, rank: int) -> StaticBytes:
    """Exact parameter, gradient-buffer and optimizer bytes of global ``rank`` (see the module
    docstring). ``cfg``'s layout must already be checked against ``world_size``."""
    from megatron.core import parallel_state as ps

    with _cuda_hidden(), fake_layout(cfg, world_size, rank):
        wrapped, _ = _build_wrapped(cfg, model_cfg)
        buffers = [b for ddp in wrapped for b in ddp.buffers + ddp.expert_parallel_buffers]
        params = [p for ddp in wrapped for p in ddp.module.parameters()]
        numel = sum(p.numel() for p in params)
        grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
        if cfg.parallel.distributed_optimizer:
            param_bytes = sum(b.param_data.numel() * b.param_data.element_size() for b in buffers)
            param_bytes += sum(
                p.numel() * p.element_size()
                for p in params
                if not any(p in b.param_index_map for b in buffers)
            )
            updated = sum(shard_elements(b, b.data_parallel_group.rank()) for b in buffers)
        else:
            param_bytes = sum(p.numel() * p.element_size() for p in params)
            updated = sum(p.numel() for p in params if p.requires_grad)
        per_element = optimizer_bytes_per_element(cfg, model_cfg)
        kept = 1.0 - (
            cfg.optimizer.optimizer_offload_fraction if cfg.optimizer.optimizer_cpu_offload else 0.0
        )
        return StaticBytes(
            rank=rank,
            stage=ps.get_pipeline_model_parallel_rank(),
            shape=_stage_shape(wrapped),
            params=numel,
            param_bytes=param_bytes,
            grad_bytes=grad_bytes,
            optimizer_bytes=round(updated * per_element * kept),
        )


def total_and_active_parameters(cfg: TrainConfig, model_cfg: ModelConfig) -> tuple[int, int, int]:
    """(total, active per token, trainable) parameters of the whole model without input
    embeddings, from the unsharded model built on the meta device as the trainer builds it
    (``training.metrics.count_parameters``; trainable: a LoRA model's adapters, else all)."""
    from megatron_prefpack.training.metrics import count_parameters
    from megatron_prefpack.training.model_setup import build_chunks, transformer_config

    single = dataclasses.replace(buildable(cfg), parallel=type(cfg.parallel)())
    moe = model_cfg.moe
    with _cuda_hidden(), fake_layout(single, 1, 0):
        tcfg = transformer_config(single, model_cfg)
        tcfg.use_cpu_initialization, tcfg.perform_initialization = True, False
        with torch.device("meta"):
            chunks = build_chunks(model_cfg, tcfg)
        total, active = count_parameters(chunks, moe.top_k if moe else 1, moe.num_experts if moe else 0)
        trainable, _ = count_parameters(chunks, 1, 0, trainable_only=True)
        return total, active, trainable


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Sizes:
    """The per-rank token counts and widths the activation formula uses."""

    tokens: float  # T: tokens per rank in tensor-parallel regions (seq_len * micro_batch / CP)
    shard_tokens: float  # T_s: tokens per rank in sequence-parallel regions
    tp: int
    element: int  # bytes of one activation element
    row_length: int
    flash: bool  # the attention kernel keeps no (query, key) scores (every GPU backend)


def _sizes(cfg: TrainConfig, model_cfg: ModelConfig) -> Sizes:
    par = cfg.parallel
    tokens = cfg.data.seq_len * cfg.data.micro_batch_size / par.context
    shard = tokens / par.tensor if par.sequence_parallel else tokens
    element = torch.finfo(torch_dtype(model_cfg.params_dtype)).bits // 8
    return Sizes(
        tokens, shard, par.tensor, element, cfg.data.seq_len, model_cfg.attention_backend != "reference"
    )


def _selective(cfg: TrainConfig) -> set[str]:
    perf = cfg.performance
    if perf.recompute_granularity != "selective":
        return set()
    return set(perf.recompute_modules or ["core_attn"])


def _attention_bytes(model_cfg: ModelConfig, z: Sizes, dropped: set[str]) -> float:
    """Saved bytes of one attention block (after its input norm), one micro-batch."""
    a, t, e, tokens = model_cfg.num_attention_heads, z.tp, z.element, z.tokens
    lse = 0.0 if "core_attn" in dropped else 4.0 * tokens * a / t
    if not z.flash and "core_attn" not in dropped:  # dense SDPA keeps the fp32 probabilities
        lse += 4.0 * tokens * z.row_length * a / t
    mla = model_cfg.mla
    if mla is None:
        g = model_cfg.num_query_groups or a
        d = model_cfg.kv_channels or model_cfg.hidden_size // a
        elements = tokens * d * ((a + 2 * g) + 2 * (a + g) + a) / t
        return elements * e + lse
    latents = 2 * tokens * ((mla.q_lora_rank or 0) + mla.kv_lora_rank + mla.qk_pos_emb_head_dim)
    dn, dr, dv = mla.qk_head_dim, mla.qk_pos_emb_head_dim, mla.v_head_dim
    up = 0.0 if "mla_up_proj" in dropped else tokens * a * (2 * (dn + dr) + dn + 2 * dv + 2 * dr) / t
    return (latents + up + tokens * a * dv / t) * e + lse


def _mlp_bytes(ffn: int, swiglu: bool, tokens: float, z: Sizes) -> float:
    """Saved bytes of a (TP-sharded) MLP of width ``ffn`` over ``tokens`` tokens."""
    return tokens * (4 if swiglu else 2) * ffn / z.tp * z.element


def _moe_bytes(model_cfg: ModelConfig, z: Sizes, dropped: set[str]) -> float:
    moe = model_cfg.moe
    h, k, e = model_cfg.hidden_size, moe.top_k, z.element
    shared = 0.0
    if moe.shared_expert_ffn_hidden_size and "shared_experts" not in dropped:
        shared = _mlp_bytes(moe.shared_expert_ffn_hidden_size, model_cfg.swiglu, z.tokens, z)
    post_norm = z.shard_tokens * h * e if moe.post_moe_norm else 0.0
    if "moe" in dropped:
        return shared + post_norm
    router = 2 * 4.0 * z.shard_tokens * moe.num_experts
    experts = _mlp_bytes(moe.expert_ffn_hidden_size, model_cfg.swiglu, k * z.tokens, z)
    if "moe_act" in dropped:
        experts /= 2
    tokens = (2 * k * z.shard_tokens + k * z.tokens) * h * e
    return router + tokens + experts + shared + post_norm


def layer_bytes(model_cfg: ModelConfig, z: Sizes, layer: int, dropped: set[str]) -> float:
    """Saved bytes of transformer layer ``layer`` (0-based) for one micro-batch, no full recompute."""
    h = model_cfg.hidden_size
    norms = (2 if "layernorm" in dropped else 4) * z.shard_tokens * h * z.element
    if model_cfg.moe_layer_pattern()[layer]:
        mlp = _moe_bytes(model_cfg, z, dropped)
    else:
        mlp = (
            0.0 if "mlp" in dropped else _mlp_bytes(model_cfg.ffn_hidden_size, model_cfg.swiglu, z.tokens, z)
        )
    return norms + _attention_bytes(model_cfg, z, dropped) + mlp


def _chunk_bytes(
    cfg: TrainConfig, model_cfg: ModelConfig, z: Sizes, layers: tuple[int, ...]
) -> tuple[float, float]:
    """(saved bytes of one model chunk for one micro-batch, the transient bytes its backward
    rebuilds or allocates once), under the configured recompute."""
    perf = cfg.performance
    dropped = _selective(cfg)
    full = [layer_bytes(model_cfg, z, i, dropped) for i in layers]
    if not full:
        return 0.0, 0.0
    checkpoint = z.shard_tokens * model_cfg.hidden_size * z.element
    n = perf.recompute_num_layers or 1
    if perf.recompute_granularity == "full" and perf.recompute_method == "uniform":
        groups = [full[i : i + n] for i in range(0, len(full), n)]
        return checkpoint * len(groups), max(sum(g) for g in groups)
    if perf.recompute_granularity == "full" and perf.recompute_method == "block":
        recomputed = full[:n]
        saved = checkpoint * len(recomputed) + sum(full[n:])
        return saved, max(max(recomputed), max(full))
    return sum(full), max(full)


def in_flight_chunks(cfg: TrainConfig, stage: int, microbatches: int) -> int:
    """Model chunks whose activations a stage holds at once under Megatron's 1F1B schedule
    (interleaved when ``parallel.virtual_pipeline`` is set)."""
    pp, vpp = cfg.parallel.pipeline, cfg.parallel.virtual_pipeline
    if vpp is None or vpp == 1:
        return min(pp - stage, microbatches)
    return min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, microbatches * vpp)


@dataclass(frozen=True)
class ActivationBytes:
    per_microbatch: float
    """Bytes saved for backward by one micro-batch through the whole stage (all its chunks)."""
    in_flight: int
    """Model chunks (of one micro-batch each) held at the peak; see :func:`in_flight_chunks`."""
    peak: float
    """``in_flight`` chunks' worth plus the backward's transient (one recomputed chunk or layer)."""


def stage_activations(
    cfg: TrainConfig, model_cfg: ModelConfig, shape: StageShape, stage: int, microbatches: int
) -> ActivationBytes:
    """Activation bytes of a pipeline stage holding ``shape`` (formula in the module docstring)."""
    z = _sizes(cfg, model_cfg)
    saved, transient = 0.0, 0.0
    for chunk in shape.chunks:
        chunk_saved, chunk_transient = _chunk_bytes(cfg, model_cfg, z, chunk)
        saved += chunk_saved
        transient = max(transient, chunk_transient)
    h = model_cfg.hidden_size
    if shape.output:
        loss = 4.0 * z.tokens * model_cfg.vocab_size / z.tp
        saved += 2 * z.shard_tokens * h * z.element + loss
        transient = max(transient, loss)
    if shape.embedding:
        saved += 8.0 * z.tokens
    chunks = in_flight_chunks(cfg, stage, microbatches)
    per_chunk = saved / len(shape.chunks)
    return ActivationBytes(per_microbatch=saved, in_flight=chunks, peak=chunks * per_chunk + transient)
