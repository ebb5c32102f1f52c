"""``prefpack train --config FILE [KEY=VALUE ...]``: DPO, reward-model or multi-response SFT.

Read top to bottom, :func:`train` is the whole job:

1. config -> torch.distributed + Megatron parallel state (gloo on CPU, NCCL on GPU);
2. data: held-out split, packing plans, this data-parallel rank's sampler;
3. policy model chunks (+ reward head), Megatron DDP, optimizer, LR schedule;
4. start from a checkpoint: resume (weights, optimizer, schedule, data position, RNG) from
   the save dir's newest checkpoint or ``checkpoint.load``, or weights only (e.g. DPO from an
   SFT model);
5. the reference: precomputed table, frozen in-job copy, or none;
6. the loop: micro-batches -> (reference pass) -> Megatron forward/backward -> optimizer step,
   logging every ``log_interval`` steps, evaluating every ``eval_interval``, saving every
   ``checkpoint.interval``; SIGTERM finishes the step, saves and exits 0;
7. final evaluation and checkpoint.

Launch with ``torchrun --nproc-per-node N prefpack train ...`` or ``srun`` (one task per GPU).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from megatron_prefpack.training.config import ConfigError, TrainConfig, load_config

DPO_KEYS = [
    "count",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
]
RM_KEYS = ["count", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"]
SFT_KEYS = ["count", "loss"]


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank (metrics are global, identical on all ranks)."""

    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    preempted: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, e.g. optimizer.lr=1e-5"
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, [*args.set, *args.overrides])
    except ConfigError as err:
        print(f"prefpack train: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except ConfigError as err:
        print(f"prefpack train: {err}", file=sys.stderr)
        return 2
    if result.preempted:
        print(f"[prefpack] stopped by SIGTERM after step {result.steps}; checkpoint {result.checkpoint}")
    return 0


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
        )
    except ValueError as err:
        raise ConfigError(f"{cfg.source}: parallel: {err}") from None


def make_model_forward(model_cfg: Any) -> Any:
    """``(model, batch) -> output``: the prefix-shared forward with the model's attention backend."""
    from megatron_prefpack.models.forward import model_forward

    return partial(model_forward, backend=model_cfg.attention_backend)


def _objective(cfg: TrainConfig) -> tuple[Any, list[str]]:
    from megatron.core import parallel_state as ps

    from megatron_prefpack.losses import objectives

    cp_group = ps.get_context_parallel_group() if cfg.parallel.context > 1 else None
    kind = cfg.objective.type
    if kind == "dpo":
        return objectives.DPOObjective(cfg.objective.dpo, cp_group=cp_group), DPO_KEYS
    if kind == "rm":
        if cfg.parallel.context > 1:
            raise ConfigError(
                f"{cfg.source}: parallel.context: reward models do not support context parallelism"
            )
        return objectives.RewardObjective(cfg.objective.rm.center_coefficient), RM_KEYS
    sft = cfg.objective.sft
    return objectives.SFTObjective(
        sft.reduction, first_only=sft.responses == "first", cp_group=cp_group
    ), SFT_KEYS


def _global_work(batches: list[Any], device: Any) -> tuple[int, int, int]:
    """Real tokens, groups and visible attention pairs of the global batch (all DP ranks)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_prefpack.training.metrics import attention_pairs

    local = [0, 0, 0]
    for batch in batches:
        for row in batch.placements:
            local[0] += sum(g.end - g.prefix_start for g in row)
            local[2] += attention_pairs(row)
        local[1] += batch.num_groups
    totals = torch.tensor(local, dtype=torch.int64, device=device)
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    tokens, groups, pairs = totals.tolist()
    return tokens, groups, pairs


def _means(sums: dict[str, float]) -> dict[str, float]:
    count = max(sums["count"], 1.0)
    return {k: v / count for k, v in sums.items() if k != "count"}


def _starting_point(cfg: TrainConfig) -> tuple[str | Path | None, bool]:
    """The checkpoint to start from, and whether it is a resume (optimizer, schedule, data
    position and RNG too) rather than weights only. A complete checkpoint in the save dir
    wins over ``checkpoint.load`` when ``checkpoint.auto_resume``."""
    from megatron_prefpack.training import checkpoint

    ckpt = cfg.checkpoint
    if ckpt.auto_resume and checkpoint.has_checkpoint(cfg.save_dir):
        return cfg.save_dir, True
    return ckpt.load, ckpt.load is not None and ckpt.load_optimizer


def train(cfg: TrainConfig) -> TrainResult:
    """Run the job described by ``cfg`` (collective: every rank calls it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import check_parallel_layout, model_config, to_yaml
    from megatron_prefpack.training.data import build_data
    from megatron_prefpack.training.metrics import MetricsLogger, count_parameters, step_flops
    from megatron_prefpack.training.model_setup import (
        attach_reward_heads,
        build_chunks,
        build_optimizer,
        transformer_config,
        wrap_for_training,
    )
    from megatron_prefpack.training.ref_logprobs import OnlineReference, ReferenceLogps
    from megatron_prefpack.training.signals import PreemptionWatcher
    from megatron_prefpack.training.step import MicroBatch, evaluate, train_step

    # 1. distributed state and layout checks
    init_distributed(cfg)
    try:
        world = dist.get_world_size()
        rank = dist.get_rank()
        device = platform.device()
        model_cfg = model_config(cfg)
        dp = check_parallel_layout(cfg, world, model_cfg)
        dp_rank = ps.get_data_parallel_rank()
        par = cfg.parallel
        tcfg = transformer_config(cfg, model_cfg)
        run_dir = Path(cfg.run.dir)
        log = MetricsLogger(run_dir, enabled=rank == 0, tensorboard=cfg.run.tensorboard)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log.info(
            f"world {world}: data {dp} x tensor {par.tensor} x pipeline {par.pipeline} x context {par.context}, "
            f"expert {par.expert}; model {model_cfg.name}; objective {cfg.objective.type}; device {device}"
        )

        # 2. data
        data = build_data(cfg, par.tensor, par.context)
        stats = data.train_plan.stats
        log.info(
            f"data: {stats.groups} train groups in {stats.rows} rows of {stats.row_length} "
            f"({cfg.data.layout}, padding {stats.padding_fraction:.1%}, {stats.skipped} skipped as too long); "
            f"{0 if data.eval_plan is None else data.eval_plan.stats.groups} held-out groups"
        )

        # 3. policy (+ reward head), starting weights, DDP, optimizer, schedule
        objective, keys = _objective(cfg)
        is_rm = cfg.objective.type == "rm"
        load, resume = _starting_point(cfg)
        # A reward-model checkpoint carries its head (attach, then load); a language-model
        # checkpoint does not (load, then attach a fresh head).
        head_first = is_rm and (load is None or checkpoint.read_state(load).objective == "rm")
        head_std = cfg.objective.rm.head_init_std
        chunks = build_chunks(model_cfg, tcfg, reward_head=head_first, head_init_std=head_std)
        if load is not None and not resume:
            checkpoint.load(load, chunks, restore_rng=False)
            log.info(f"started from the weights of {checkpoint.resolve(load)}")
        if is_rm and not head_first:
            attach_reward_heads(chunks, head_std)
        reference_chunks = None
        if cfg.reference.mode == "online":
            reference_chunks = build_chunks(model_cfg, copy.copy(tcfg))
            reference_load = cfg.reference.load
            if reference_load is None and resume and not cfg.checkpoint.load_optimizer:
                reference_load = cfg.checkpoint.load  # the weights this run started from
            if reference_load is not None:
                checkpoint.load(reference_load, reference_chunks, restore_rng=False)
            elif resume:
                raise ConfigError(
                    f"{cfg.source}: reference.load: resuming with an online reference needs its "
                    "checkpoint (this run did not start from a weights-only checkpoint.load)"
                )
            else:  # the reference is the policy's starting point
                for ref_chunk, chunk in zip(reference_chunks, chunks, strict=True):
                    ref_chunk.load_state_dict(chunk.state_dict())
            for ref_chunk in reference_chunks:
                ref_chunk.requires_grad_(False)
        model = wrap_for_training(chunks, tcfg, par.distributed_optimizer)
        optimizer, scheduler = build_optimizer(cfg, model, tcfg)

        # 4. resume: weights, optimizer, schedule, data position, RNG
        step, consumed_rows = 0, 0
        if resume:
            state = checkpoint.load(load, model, optimizer, restore_rng=True)
            step, consumed_rows = state.step, state.consumed_rows
            scheduler.load_state_dict(state.scheduler)
            log.info(f"resumed from {checkpoint.resolve(load)} at step {step}")

        # 5. reference log-probs
        forward = make_model_forward(model_cfg)
        online = None
        table = None
        if cfg.reference.mode == "offline":
            table = ReferenceLogps.load(cfg.reference.path, len(data.dataset))
        elif cfg.reference.mode == "online":
            max_k = int(data.dataset.token_lengths().num_responses.max())
            online = OnlineReference(reference_chunks, forward, len(data.dataset), max_k)

        def reference_for(batches: list[Any]) -> Any:
            if online is not None:
                return online.prepare(batches)
            return table

        # 6. the loop
        moe = model_cfg.moe
        total_params, active_params = count_parameters(
            model, moe.top_k if moe else 1, moe.num_experts if moe else 0
        )
        log.info(
            f"parameters: {total_params / 1e6:.2f} M total, {active_params / 1e6:.2f} M active per token"
        )
        attn_dim = (model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads) * (
            model_cfg.num_attention_heads
        )
        passes = 3.0 + (1.0 if online is not None else 0.0)
        sampler = data.sampler(dp_rank, dp, cfg, consumed_rows)
        batch_iter = iter(sampler)
        eval_chunk_rows = (
            cfg.data.micro_batch_size if par.pipeline == 1 else int(data.train_plan.bin_offsets[1])
        )
        eval_rows = cfg.run.eval_batches * cfg.data.global_batch_size or None
        result = TrainResult(steps=step)

        def run_eval() -> None:
            items = [
                MicroBatch(b, max(objective.count(b), 1), counted)
                for b, counted in data.eval_micro_batches(dp_rank, dp, eval_chunk_rows, eval_rows, device)
            ]
            if not items:
                return
            ref = reference_for([i.batch for i in items])
            sums = evaluate(model, items, objective, keys, forward, ref, device)
            metrics = {**_means(sums), "count": round(sums["count"])}
            result.evals.append({"step": step, **metrics})
            log.log("eval", step, metrics)

        def save() -> Path:
            state = checkpoint.CheckpointState(
                step=step,
                consumed_rows=consumed_rows,
                scheduler=scheduler.state_dict(),
                objective=cfg.objective.type,
                config_yaml=to_yaml(cfg),
                world_size=world,
            )
            path = checkpoint.save(cfg.save_dir, state, model, optimizer, cfg.checkpoint.keep)
            log.info(f"saved checkpoint {path}")
            return path

        run_eval()
        steps_per_mb = sampler.num_micro_batches
        with PreemptionWatcher() as watcher:
            while step < cfg.run.train_steps:
                rows = list(itertools.islice(batch_iter, steps_per_mb))
                batches = [data.train_rows.batch(r).to(device) for r in rows]
                out = train_step(
                    model,
                    optimizer,
                    scheduler,
                    batches,
                    objective,
                    keys,
                    forward,
                    reference_for(batches),
                    device,
                    sum(model_cfg.moe_layer_pattern()),
                )
                step += 1
                consumed_rows += cfg.data.global_batch_size
                tokens, groups, pairs = _global_work(batches, device)
                flops = step_flops(active_params, tokens, pairs, model_cfg.num_layers, attn_dim, passes)
                metrics = {
                    **_means(out.sums),
                    **out.aux_losses,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(out.grad_norm) if out.grad_norm is not None else float("nan"),
                    "tokens_per_s": tokens / out.seconds,
                    "groups_per_s": groups / out.seconds,
                    "tflops_per_device": flops / out.seconds / world / 1e12,
                    "step_s": out.seconds,
                }
                result.history.append({"step": step, **metrics})
                console = step % cfg.run.log_interval == 0 or step == cfg.run.train_steps
                log.log("train", step, metrics, console=console)
                if cfg.run.eval_interval and step % cfg.run.eval_interval == 0 and step < cfg.run.train_steps:
                    run_eval()
                if watcher.should_stop(device):
                    result.preempted = True
                    break
                if (
                    cfg.checkpoint.interval
                    and step % cfg.checkpoint.interval == 0
                    and step < cfg.run.train_steps
                ):
                    save()
        # 7. the end
        result.steps = step
        if not result.preempted:
            run_eval()
        result.checkpoint = save()
        log.close()
        return result
    finally:
        platform.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(prog="prefpack train")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
