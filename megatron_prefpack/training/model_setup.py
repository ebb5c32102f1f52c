"""Models, DDP, optimizer and LR schedule for ``prefpack train`` / ``prefpack ref-logprobs``.

Everything here is Megatron-Core's own machinery: ``GPTModel`` chunks (one per virtual
pipeline stage) from :func:`megatron_prefpack.models.build_model`, ``Float16Module`` for
bf16/fp16, Megatron ``DistributedDataParallel``, ``get_megatron_optimizer`` (the distributed
optimizer when configured) and ``OptimizerParamScheduler``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state as ps

from megatron_prefpack.models.builder import build_model
from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.training.config import ConfigError, DDPConfig, TrainConfig, config_error


def init_distributed(cfg: TrainConfig) -> None:
    """torch.distributed and Megatron's parallel state for ``cfg.parallel`` (CPU: gloo)."""
    from megatron_prefpack.platform import distributed as platform

    par = cfg.parallel
    try:
        platform.initialize(
            tensor_parallel=par.tensor,
            pipeline_parallel=par.pipeline,
            context_parallel=par.context,
            expert_parallel=par.expert,
            virtual_pipeline_parallel=par.virtual_pipeline,
            seed=cfg.run.seed,
            timeout_minutes=cfg.run.timeout_minutes,
        )
    except ValueError as err:
        raise ConfigError(f"{cfg.source}: parallel: {err}") from None


def init_tp_comm_overlap(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Transformer Engine's userbuffers for ``performance.tp_comm_overlap`` (Megatron-LM's
    ``_initialize_tp_communicators``): one buffer of ``(seq_len * micro_batch_size / context,
    hidden)``, FP8 when ``performance.fp8`` is set, TE's default overlap settings, NCCL
    bootstrap. Call after :func:`init_distributed` and before building the model; does nothing
    when the key is off. Raises ``ConfigError`` naming the key where it cannot run."""
    if not cfg.performance.tp_comm_overlap:
        return
    from megatron_prefpack.platform.features import missing_for

    reason = missing_for(("cuda", "transformer_engine"))
    if reason:
        raise config_error(cfg, "performance.tp_comm_overlap", reason)
    from megatron.core.utils import is_te_min_version
    from transformer_engine.pytorch import module as te_module

    if not is_te_min_version("1.9.0"):
        raise config_error(
            cfg, "performance.tp_comm_overlap", "needs Transformer Engine >= 1.9 (NCCL bootstrap)"
        )
    par = cfg.parallel
    shape = [cfg.data.seq_len * cfg.data.micro_batch_size // par.context, model_cfg.hidden_size]
    fp8 = cfg.performance.fp8 is not None
    if is_te_min_version("2.7.0"):
        mode = te_module.base.UserBufferQuantizationMode
        precision: dict[str, Any] = {"quantization_modes": [mode.FP8 if fp8 else mode.NONE]}
    else:
        precision = {"use_fp8": fp8}
    te_module.base.initialize_ub(
        shape=shape, tp_size=par.tensor, ub_cfgs={}, bootstrap_backend="nccl", **precision
    )


def make_model_forward(model_cfg: Any) -> Any:
    """``(model, batch) -> output``: the prefix-shared forward with the model's attention backend."""
    from megatron_prefpack.models.forward import model_forward

    return partial(model_forward, backend=model_cfg.attention_backend)


def transformer_config(cfg: TrainConfig, model_cfg: ModelConfig) -> Any:
    """Megatron's TransformerConfig for ``model_cfg`` under ``cfg.parallel`` (expert TP = TP,
    the pipeline split as configured) with ``cfg.performance``'s settings."""
    from megatron_prefpack.models.config import to_transformer_config

    par = cfg.parallel
    return to_transformer_config(
        model_cfg,
        tensor_parallel=par.tensor,
        pipeline_parallel=par.pipeline,
        context_parallel=par.context,
        expert_parallel=par.expert,
        expert_tensor_parallel=par.tensor,
        sequence_parallel=par.sequence_parallel,
        virtual_pipeline_parallel=par.virtual_pipeline,
        num_layers_in_first_pipeline_stage=par.first_stage_layers,
        num_layers_in_last_pipeline_stage=par.last_stage_layers,
        pipeline_model_parallel_layout=par.pipeline_layout,
        **performance_settings(cfg, model_cfg),
    )


def performance_settings(cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """``cfg.performance`` as TransformerConfig keyword arguments (MoE keys for MoE models only;
    FP8 and TP-overlap keys only when set, so CPU configs stay as Megatron's defaults)."""
    perf = cfg.performance
    settings: dict[str, Any] = dict(
        recompute_granularity=perf.recompute_granularity,
        recompute_method=perf.recompute_method,
        recompute_num_layers=perf.recompute_num_layers,
        recompute_modules=list(perf.recompute_modules) if perf.recompute_modules is not None else None,
    )
    if model_cfg.moe is not None:
        settings.update(
            moe_grouped_gemm=perf.moe_grouped_gemm,
            moe_permute_fusion=perf.moe_permute_fusion,
            moe_token_dispatcher_type=perf.moe_token_dispatcher_type,
            moe_shared_expert_overlap=perf.moe_shared_expert_overlap,
        )
    if perf.fp8 is not None:
        settings.update(fp8=perf.fp8, fp8_recipe=perf.fp8_recipe)
    if perf.tp_comm_overlap:
        settings.update(tp_comm_overlap=True)
    if perf.gradient_accumulation_fusion:
        settings.update(gradient_accumulation_fusion=True)
    return settings


def build_chunks(
    model_cfg: ModelConfig,
    transformer_config: Any,
    reward_head: bool = False,
    head_init_std: float | None = None,
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), unwrapped.

    ``reward_head`` attaches a :class:`~megatron_prefpack.losses.reward.RewardHead` (attach
    before loading a reward-model checkpoint, after loading a language-model one). A LoRA model
    (``model_cfg.lora``) comes with everything but
    :func:`~megatron_prefpack.training.checkpoint.lora_trained` frozen, so Megatron's
    DDP and optimizer, built on it next, hold the adapters (and a reward head) only; a head
    attached later is trainable too."""
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None or vpp == 1 else list(range(vpp))
    chunks = [build_model(model_cfg, transformer_config, vp_stage=stage) for stage in stages]
    if reward_head:
        attach_reward_heads(chunks, head_init_std)
    if model_cfg.lora is not None:
        from megatron_prefpack.models.lora import freeze_base
        from megatron_prefpack.training.checkpoint import lora_trained

        for chunk in chunks:
            freeze_base([chunk], lora_trained(chunk))
    return chunks


def attach_reward_heads(chunks: list[torch.nn.Module], init_std: float | None) -> None:
    from megatron_prefpack.losses.reward import attach_reward_head

    for chunk in chunks:
        attach_reward_head(chunk, init_std=init_std)


def ddp_config(ddp: DDPConfig, distributed_optimizer: bool, num_chunks: int) -> Any:
    """Megatron's ``DistributedDataParallelConfig`` for ``ddp``. Parameter all-gathers are
    aligned across pipeline stages (``align_param_gather``) with a virtual pipeline only, as
    Megatron-LM does (its non-interleaved schedule never calls ``param_sync_func``)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=ddp.grad_reduce_in_fp32,
        overlap_grad_reduce=ddp.overlap_grad_reduce,
        overlap_param_gather=ddp.overlap_param_gather,
        align_param_gather=ddp.overlap_param_gather and num_chunks > 1,
        bucket_size=ddp.bucket_size,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
    )


def _per_chunk(funcs: list[Callable[..., Any]]) -> Callable[..., Any] | list[Callable[..., Any]]:
    """A schedule hook as Megatron's schedules take it: one callable, or one per model chunk."""
    return funcs[0] if len(funcs) == 1 else funcs


def wrap_for_training(
    chunks: list[torch.nn.Module],
    transformer_config: Any,
    distributed_optimizer: bool,
    ddp: DDPConfig | None = None,
) -> list[torch.nn.Module]:
    """``Float16Module`` (bf16/fp16) + Megatron DDP with ``ddp``'s settings (default: none
    overlapped) around every chunk, and the hooks Megatron's pipeline schedules call, set as
    Megatron-LM's training loop sets them:

    * ``no_sync_func``: each chunk's ``no_sync`` (no reduction before a chunk's last micro-batch);
    * ``grad_sync_func`` (``overlap_grad_reduce``): each chunk's ``start_grad_sync``, which the
      schedule calls once a chunk's last backward is done (aligned across pipeline stages);
      the buckets of later steps start their reduction from DDP's gradient hooks, bucket by
      bucket, while the backward pass continues;
    * ``param_sync_func`` (``overlap_param_gather`` with a virtual pipeline): each chunk's
      ``start_param_sync``;
    * ``finalize_model_grads_func``: Megatron's ``finalize_model_grads``, which waits for every
      outstanding reduction, so the gradients are complete when the schedule returns.

    Under ``overlap_param_gather`` the optimizer step updates only this rank's shard and gathers
    nothing; DDP's forward pre-hooks gather the updated parameters during the next forward.
    Read parameters outside a training step inside :func:`synced_params`.

    Only the first chunk buckets its gradients (later chunks' reductions overlap with the
    earlier chunks' backward anyway), as Megatron-LM does for virtual pipelines.
    """
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    ddp = ddp or DDPConfig()
    config = ddp_config(ddp, distributed_optimizer, len(chunks))
    wrapped = []
    for i, chunk in enumerate(chunks):
        if transformer_config.bf16 or transformer_config.fp16:
            chunk = Float16Module(transformer_config, chunk)
        wrapped.append(DistributedDataParallel(transformer_config, config, chunk, disable_bucketing=i > 0))
    transformer_config.no_sync_func = _per_chunk([c.no_sync for c in wrapped])
    transformer_config.grad_sync_func = (
        _per_chunk([c.start_grad_sync for c in wrapped]) if ddp.overlap_grad_reduce else None
    )
    transformer_config.param_sync_func = (
        _per_chunk([c.start_param_sync for c in wrapped]) if config.align_param_gather else None
    )
    transformer_config.finalize_model_grads_func = finalize_model_grads
    return wrapped


@contextlib.contextmanager
def synced_params(model: list[torch.nn.Module], optimizer: Any) -> Iterator[None]:
    """Every rank's parameters complete for the block (evaluation, checks, saving).

    Under ``ddp.overlap_param_gather`` the parameters the last optimizer step updated are
    all-gathered now, synchronously, and DDP's forward pre-hooks are removed for the block and
    put back after it (Megatron-LM's ``disable_forward_pre_hook`` / ``enable_forward_pre_hook``
    around evaluation and checkpointing). Otherwise the parameters are always complete and
    this does nothing. Collective over the data-parallel group."""
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    if not hooked:
        yield
        return
    # megatron-core >= 0.19 stages optimizer-owned parameters first (a no-op unless MXFP8
    # parameters share the gradient buffer); 0.16 has no such step.
    prepare = getattr(optimizer, "prepare_model_params_for_param_sync", None)
    if prepare is not None:
        prepare()
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def num_buckets(model: list[torch.nn.Module]) -> int:
    """Gradient-reduction buckets of the wrapped ``model`` (dense and expert buffers)."""
    return sum(
        len(buffer.buckets) for chunk in model for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]
    )


def build_optimizer(cfg: TrainConfig, chunks: list[torch.nn.Module], transformer_config: Any) -> Any:
    """Megatron's Adam (distributed when configured) with ``cfg.optimizer``'s settings,
    including the precision-aware optimizer (moments in ``exp_avg_dtype`` /
    ``exp_avg_sq_dtype``) and CPU offload of ``optimizer_offload_fraction`` of the state (both
    GPU-only; ``training.config`` refuses them elsewhere). The field names are the same in
    megatron-core 0.16 and 0.19."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_prefpack.models.config import torch_dtype

    opt = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=transformer_config.bf16,
            fp16=transformer_config.fp16,
            params_dtype=transformer_config.params_dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            use_precision_aware_optimizer=opt.use_precision_aware_optimizer,
            exp_avg_dtype=torch_dtype(opt.exp_avg_dtype),
            exp_avg_sq_dtype=torch_dtype(opt.exp_avg_sq_dtype),
            optimizer_cpu_offload=opt.optimizer_cpu_offload,
            optimizer_offload_fraction=opt.optimizer_offload_fraction,
        ),
        chunks,
    )
    transformer_config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(cfg: TrainConfig, optimizer: Any) -> Any:
    """Megatron's ``OptimizerParamScheduler``: warmup, then decay to ``min_lr``.

    On resume, loading its state keeps the checkpoint's settings unless
    ``override_opt_param_scheduler`` is set (then this config's win, at the loaded step)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = cfg.optimizer
    decay_steps = max(opt.decay_steps or cfg.run.train_steps, opt.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.warmup_steps else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=opt.decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


def apply_optimizer_settings(optimizer: Any, cfg: TrainConfig) -> None:
    """Give an optimizer built (and loaded) with another run's settings ``cfg.optimizer``'s:
    Adam betas and eps, the per-group ``max_lr``/``min_lr``/``start_wd``/``end_wd`` that
    Megatron's schedule reads, and ``clip_grad``. The optimizer state (moments, steps) is kept.
    Megatron 0.19 matches saved param groups by their lr settings, so a resumed optimizer is
    built with the checkpoint's settings, loaded, then given the new ones here."""
    from megatron_prefpack.training.checkpoint import optimizer_members

    opt = cfg.optimizer
    for member in optimizer_members(optimizer):
        member.config.clip_grad = opt.clip_grad
        for group in member.optimizer.param_groups:
            group["betas"] = (opt.adam_beta1, opt.adam_beta2)
            group["eps"] = opt.adam_eps
            updates = {
                "max_lr": opt.lr,
                "min_lr": opt.min_lr,
                "start_wd": opt.weight_decay,
                "end_wd": opt.weight_decay,
            }
            for key, value in updates.items():
                if group.get(key) is not None:
                    group[key] = value
