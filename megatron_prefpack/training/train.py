"""``prefpack train --config FILE [KEY=VALUE ...]``: DPO, reward-model or multi-response SFT.

Read top to bottom, :func:`train` is the whole job:

1. config -> torch.distributed + Megatron parallel state (gloo on CPU, NCCL on GPU);
2. data: held-out split, packing plans, this data-parallel rank's sampler;
3. policy model chunks (+ reward head), Megatron DDP, optimizer, LR schedule;
4. start from a checkpoint: resume (weights, optimizer, schedule, data position, RNG) from
   the save dir's newest checkpoint or ``checkpoint.load``, or weights only (e.g. DPO from an
   SFT model);
5. the reference: precomputed table, frozen in-job copy, the policy with its LoRA adapters
   switched off (``base``), or none;
6. the loop: micro-batches -> (reference pass) -> Megatron forward/backward -> optimizer step,
   logging every ``log_interval`` steps, evaluating every ``eval_interval``, saving every
   ``checkpoint.interval``;
7. final evaluation and checkpoint.

Faults (README "Reliability"): SIGTERM at any phase ends in a saved checkpoint and exit 0 (an
evaluation in progress is abandoned); a step whose loss or gradients are NaN/inf applies no
update, and ``run.max_nonfinite_steps`` of them in a row stop the run (exit 3, nothing saved);
a collective that waits longer than ``run.timeout_minutes`` ends the job non-zero; a second run
in the same directories stops at once (exit 2); bad inputs and refused resumes exit 2.

Launch with ``torchrun --nproc-per-node N prefpack train ...`` or ``srun`` (one task per GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_prefpack.training.config import ConfigError, TrainConfig, config_error, load_config

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """``run.max_nonfinite_steps`` consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What :func:`train` returns on every rank (metrics are global, identical on all ranks)."""

    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    preempted: bool = False
    nonfinite_steps: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, e.g. optimizer.lr=1e-5"
    )


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (config, data, checkpoint, a busy run dir): exit 2."""
    from megatron_prefpack.data.group_dataset import DatasetError
    from megatron_prefpack.training.checkpoint import CheckpointError
    from megatron_prefpack.training.run_lock import RunLockError

    return ConfigError, DatasetError, CheckpointError, RunLockError


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, [*args.set, *args.overrides])
    except ConfigError as err:
        print(f"prefpack train: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = train(cfg)
    except _input_errors() as err:
        print(f"prefpack train: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as err:
        print(f"prefpack train: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except RuntimeError as err:
        if "timed out" in str(err).lower() or "timeout" in str(err).lower():
            print(
                f"prefpack train: a collective did not finish within run.timeout_minutes="
                f"{cfg.run.timeout_minutes:g}: a peer rank stalled or died ({err})",
                file=sys.stderr,
            )
            return 1
        raise
    if result.preempted:
        saved = result.checkpoint or "none needed (no step was trained)"
        print(f"[prefpack] stopped by SIGTERM after step {result.steps}; checkpoint {saved}")
    return 0


def _objective(cfg: TrainConfig) -> tuple[Any, list[str]]:
    """The objective ``cfg.objective`` configures and the metric keys the trainer sums over
    micro-batches and ranks: ``count`` and the objective's own (``losses.objectives``)."""
    from megatron.core import parallel_state as ps

    from megatron_prefpack.losses import objectives

    cp_group = ps.get_context_parallel_group() if cfg.parallel.context > 1 else None
    kind = cfg.objective.type
    if kind == "dpo":
        objective = objectives.DPOObjective(cfg.objective.dpo, cp_group=cp_group)
    elif kind == "rm":
        objective = objectives.RewardObjective(cfg.objective.rm.center_coefficient, cp_group=cp_group)
    else:
        sft = cfg.objective.sft
        objective = objectives.SFTObjective(
            sft.reduction,
            first_only=sft.responses == "first",
            cp_group=cp_group,
            response_weights=None if sft.response_weights is None else tuple(sft.response_weights),
        )
    return objective, ["count", *objective.metric_keys]


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
    """Metric sums -> means: ``<name>`` over ``count/<name>`` where the objective gives one,
    else over ``count`` (``losses.objectives``); the counts themselves are left out."""
    count = sums["count"]
    return {k: v / max(sums.get(f"count/{k}", count), 1.0) for k, v in sums.items() if not _is_count(k)}


def _is_count(key: str) -> bool:
    """Whether a metric key is a count (``count``, ``count/<name>``) rather than a metric."""
    return key == "count" or key.startswith("count/")


def _starting_point(cfg: TrainConfig, log: Any) -> tuple[str | Path | None, bool]:
    """The checkpoint to start from, and whether it is a resume (optimizer, schedule, data
    position and RNG too) rather than weights only. The newest complete, verified checkpoint
    in the save dir wins over ``checkpoint.load`` when ``checkpoint.auto_resume``; a save dir
    that holds checkpoints but none usable raises ``CheckpointError`` (never a silent step 0).
    A ``checkpoint.load`` that holds weights only (``prefpack merge`` / ``merge-lora`` output)
    starts from its weights whatever ``load_optimizer`` says: there is nothing else to resume."""
    from megatron_prefpack.training import checkpoint

    ckpt = cfg.checkpoint
    if ckpt.auto_resume:
        point = checkpoint.find_resume(cfg.save_dir)
        if point is not None:
            for note in point.notes:
                log.info(note)
            return point.path, True
    if ckpt.load is None:
        return None, False
    from_weights = _starts_from_weights(cfg)
    if from_weights and ckpt.load_optimizer:
        log.info(
            f"checkpoint.load {ckpt.load} holds weights only (no optimizer state or schedule): "
            "starting from its weights at step 0"
        )
    return ckpt.load, not from_weights


def _starts_from_weights(cfg: TrainConfig) -> bool:
    """Whether this run started (or starts) from the weights of ``checkpoint.load`` alone:
    ``load_optimizer: false``, or a weights-only checkpoint (``prefpack merge`` /
    ``merge-lora`` output), which has nothing else to resume."""
    from megatron_prefpack.training import checkpoint

    ckpt = cfg.checkpoint
    return ckpt.load is not None and (
        not ckpt.load_optimizer or checkpoint.read_state(ckpt.load).weights_only
    )


def _check_resume_config(cfg: TrainConfig, saved: TrainConfig, where: Path, log: Any) -> bool:
    """Compare the resumed checkpoint's config ``saved`` with this run's: data, model, parallel
    layout, objective or seed changes are refused (``ConfigError`` listing them); optimizer
    changes are announced and returned True (the caller applies them); performance and DDP
    changes are announced."""
    from megatron_prefpack.training.config import resume_changes

    changes = resume_changes(saved, cfg)
    if changes.refused:
        listed = "; ".join(str(c) for c in changes.refused)
        raise ConfigError(
            f"{cfg.source}: resuming {where} with a different config: {listed}. These change what "
            "is trained; start a new run (checkpoint.load with load_optimizer: false, another "
            "checkpoint.save) or restore the old values"
        )
    for change in changes.applied:
        log.info(f"resume: applying the changed optimizer setting {change}")
    for change in changes.noted:
        log.info(f"resume: changed speed/memory setting {change}")
    return bool(changes.applied)


def _lora_base(
    cfg: TrainConfig, model_cfg: Any, start: Path | None, start_state: Any, log: Any
) -> dict[str, Any] | None:
    """The full checkpoint a LoRA run's adapters apply to (``checkpoint.identity``), which its
    checkpoints record: the one a resumed or loaded LoRA checkpoint names, else the full
    checkpoint the run starts from. None without ``model.lora``; a LoRA run from nothing is
    refused (``ConfigError``)."""
    from megatron_prefpack.training import checkpoint

    if model_cfg.lora is None:
        return None
    if start is None:
        raise config_error(
            cfg,
            "checkpoint.load",
            "a LoRA run (model.lora) trains adapters on a base model: name its full checkpoint here",
            related=["model.lora"],
        )
    base = start_state.base or checkpoint.identity(start)
    log.info(f"LoRA: base weights from {base['path']} (step {base['step']}), frozen")
    return base


def _check_vocab(cfg: TrainConfig, model_cfg: Any, dataset: Any) -> None:
    """The model's embedding must cover every id the dataset's tokenizer can produce."""
    tokenizer_vocab = dataset.vocab_size
    if tokenizer_vocab is not None and model_cfg.vocab_size < tokenizer_vocab:
        raise config_error(
            cfg,
            "model.vocab_size",
            f"{model_cfg.vocab_size} is smaller than the vocabulary of the dataset's tokenizer "
            f"({tokenizer_vocab}, {cfg.data.path}/dataset.json)",
            related=["model.preset", "data.path"],
        )


def _fill_to_multiple(items: list[Any], multiple: int) -> list[Any]:
    """``items`` (``MicroBatch``) and uncounted repeats of the first one, up to a multiple of
    ``multiple`` in number."""
    return items + [dataclasses.replace(items[0], counted=False)] * (-len(items) % multiple)


def _params_finite(model: list[Any], device: Any) -> bool:
    """Whether every rank's parameters are all finite (collective)."""
    import torch

    from megatron_prefpack.training.step import all_finite

    local = all(bool(torch.isfinite(p).all()) for chunk in model for p in chunk.parameters())
    return all_finite(local, device)


def train(cfg: TrainConfig) -> TrainResult:
    """Run the job described by ``cfg`` (collective: every rank calls it)."""
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training.model_setup import init_distributed
    from megatron_prefpack.training.signals import PreemptionWatcher

    # SIGTERM is recorded from the first moment, so no phase of the job can lose it.
    with PreemptionWatcher() as watcher:
        init_distributed(cfg)
        try:
            return _train(cfg, watcher)
        finally:
            platform.destroy()


@contextlib.contextmanager
def _lock_run_dirs(cfg: TrainConfig, rank: int) -> Iterator[list[str]]:
    """Rank 0 holds the run and save directories' lock for the block; every rank raises
    ``RunLockError`` if it could not be taken. Yields what was found stale and taken over."""
    import torch.distributed as dist

    from megatron_prefpack.training.run_lock import RunLock, RunLockError

    lock = RunLock([Path(cfg.run.dir), cfg.save_dir]) if rank == 0 else None
    error: list[str | None] = [None]
    if lock is not None:
        try:
            lock.acquire()
        except RunLockError as err:
            error = [str(err)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RunLockError(error[0])
    try:
        yield lock.notes if lock is not None else []
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, watcher: Any) -> TrainResult:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import (
        check_parallel_layout,
        config_from_yaml,
        model_config,
        to_yaml,
    )
    from megatron_prefpack.training.data import build_data
    from megatron_prefpack.training.metrics import (
        MetricsLogger,
        StepLog,
        attention_width,
        count_parameters,
        memory_metrics,
        step_flops,
    )
    from megatron_prefpack.training.model_setup import (
        apply_optimizer_settings,
        attach_reward_heads,
        build_chunks,
        build_optimizer,
        build_scheduler,
        init_tp_comm_overlap,
        make_model_forward,
        num_buckets,
        synced_params,
        transformer_config,
        wrap_for_training,
    )
    from megatron_prefpack.training.ref_logprobs import OnlineReference, ReferenceLogps
    from megatron_prefpack.training.step import MicroBatch, evaluate, train_step

    # 1. distributed state, layout checks, exclusive use of the run and save dirs
    world = dist.get_world_size()
    rank = dist.get_rank()
    device = platform.device()
    model_cfg = model_config(cfg)
    dp = check_parallel_layout(cfg, world, model_cfg)
    dp_rank = ps.get_data_parallel_rank()
    par = cfg.parallel
    tcfg = transformer_config(cfg, model_cfg)
    run_dir = Path(cfg.run.dir)
    with _lock_run_dirs(cfg, rank) as lock_notes, MetricsLogger(cfg, enabled=rank == 0) as log:
        for note in lock_notes:
            log.info(note)
        if rank == 0:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log.info(
            f"world {world}: data {dp} x tensor {par.tensor} x pipeline {par.pipeline} x context {par.context}, "
            f"expert {par.expert}; model {model_cfg.name}; objective {cfg.objective.type}; device {device}"
        )

        # 2. data
        data = build_data(cfg, par.tensor, par.context)
        _check_vocab(cfg, model_cfg, data.dataset)
        stats = data.train_plan.stats
        log.info(
            f"data: {stats.groups} train groups in {stats.rows} rows of {stats.row_length} "
            f"({cfg.data.layout}, padding {stats.padding_fraction:.1%}, {stats.skipped} skipped as too long); "
            f"{0 if data.eval_plan is None else data.eval_plan.stats.groups} held-out groups"
        )

        # 3. policy (+ reward head), starting weights, DDP, optimizer, schedule
        objective, keys = _objective(cfg)
        best = _best_policy(cfg, keys)
        is_rm = cfg.objective.type == "rm"
        load, resume = _starting_point(cfg, log)
        start = checkpoint.resolve(load) if load is not None else None  # the iteration dir
        start_state = checkpoint.read_state(start) if start is not None else None
        optimizer_cfg = cfg  # the settings the optimizer is built with (a resume: the checkpoint's)
        override_schedule = False
        if resume:
            saved = config_from_yaml(start_state.config_yaml, f"{start}/{checkpoint.META}")
            override_schedule = _check_resume_config(cfg, saved, start, log)
            optimizer_cfg = saved
        # A reward-model checkpoint carries its head (attach, then load); a language-model
        # checkpoint does not (load, then attach a fresh head).
        head_first = is_rm and (start_state is None or start_state.objective == "rm")
        head_std = cfg.objective.rm.head_init_std
        init_tp_comm_overlap(cfg, model_cfg)
        chunks = build_chunks(model_cfg, tcfg, reward_head=head_first, head_init_std=head_std)
        if start is not None and not resume:
            checkpoint.load(start, chunks, restore_rng=False)
            log.info(f"started from the weights of {start}")
        if is_rm and not head_first:
            attach_reward_heads(chunks, head_std)
        base = _lora_base(cfg, model_cfg, start, start_state, log)
        reference_chunks = None
        if cfg.reference.mode == "online":
            reference_chunks = build_chunks(model_cfg, copy.copy(tcfg))
            reference_load = cfg.reference.load
            if reference_load is None and resume and _starts_from_weights(cfg):
                reference_load = cfg.checkpoint.load  # the weights this run started from
            if reference_load is not None:
                checkpoint.load(reference_load, reference_chunks, restore_rng=False)
            elif resume:
                raise config_error(
                    cfg,
                    "reference.load",
                    "resuming with an online reference needs its checkpoint (this run did not "
                    "start from a weights-only checkpoint.load)",
                )
            else:  # the reference is the policy's starting point
                for ref_chunk, chunk in zip(reference_chunks, chunks, strict=True):
                    ref_chunk.load_state_dict(chunk.state_dict())
            for ref_chunk in reference_chunks:
                ref_chunk.requires_grad_(False)
        model = wrap_for_training(chunks, tcfg, par.distributed_optimizer, cfg.ddp)
        optimizer = build_optimizer(optimizer_cfg, model, tcfg)
        scheduler = build_scheduler(cfg, optimizer)
        ddp = cfg.ddp
        log.info(
            f"DDP: {num_buckets(model)} gradient bucket(s) on this rank; overlapped gradient "
            f"reduction {ddp.overlap_grad_reduce}, parameter all-gather {ddp.overlap_param_gather}"
        )

        # 4. resume: weights, optimizer, schedule, data position, RNG
        step, consumed_rows = 0, 0
        if resume:
            state = checkpoint.load(start, model, optimizer, restore_rng=True)
            step, consumed_rows = state.step, state.consumed_rows
            apply_optimizer_settings(optimizer, cfg)
            # Megatron's schedule keeps the checkpoint's values unless told to override them.
            scheduler.override_opt_param_scheduler = override_schedule
            scheduler.load_state_dict(state.scheduler)
            log.info(f"resumed from {start} at step {step}")

        # 5. reference log-probs
        forward = make_model_forward(model_cfg)
        online = None
        table = None
        if cfg.reference.mode == "offline":
            table = ReferenceLogps.load(cfg.reference.path, data.dataset, cfg.reference.load)
            log.info(f"reference log-probs: {table.describe()}")
        elif cfg.reference.mode in ("online", "base"):
            max_k = int(data.dataset.token_lengths().num_responses.max())
            if cfg.reference.mode == "online":
                online = OnlineReference(reference_chunks, forward, len(data.dataset), max_k)
            else:
                from megatron_prefpack.models.lora import adapters_disabled

                online = OnlineReference(
                    model, forward, len(data.dataset), max_k, context=lambda: adapters_disabled(model)
                )
                log.info("reference log-probs: the policy with its LoRA adapters switched off (base)")

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
        if base is not None:
            trainable, _ = count_parameters(model, 1, 0, trainable_only=True)
            log.info(
                f"trainable parameters: {trainable:,} of {total_params:,} ({trainable / total_params:.3%}; "
                "input embeddings not counted): LoRA adapters" + (" and the reward head" if is_rm else "")
            )
        attn_dim = attention_width(model_cfg)
        passes = 3.0 + (1.0 if online is not None else 0.0)
        sampler = data.sampler(dp_rank, dp, cfg, consumed_rows)
        batch_iter = iter(sampler)
        steps_per_mb = sampler.num_micro_batches
        eval_chunk_rows = (
            cfg.data.micro_batch_size if par.pipeline == 1 else int(data.train_plan.bin_offsets[1])
        )
        eval_rows = cfg.run.eval_batches * cfg.data.global_batch_size or None
        result = TrainResult(steps=step)
        start_step = step
        saved_step = None  # the step of the newest checkpoint in the save dir, once there is one
        if resume and start.parent.resolve() == cfg.save_dir.resolve():
            saved_step, result.checkpoint = step, start

        # Megatron's interleaved schedule runs whole groups of `pipeline` micro-batches.
        schedule_multiple = par.pipeline if par.virtual_pipeline else 1

        def run_eval() -> dict[str, float] | None:
            """Evaluate the held-out split in pieces of one step's micro-batches and log it; a
            SIGTERM between pieces abandons the evaluation (the caller saves). Returns the
            metrics (None: no held-out split, or abandoned)."""
            with synced_params(model, optimizer):
                return evaluate_held_out()

        def evaluate_held_out() -> dict[str, float] | None:
            items = [
                MicroBatch(b, max(objective.count(b), 1), counted)
                for b, counted in data.eval_micro_batches(dp_rank, dp, eval_chunk_rows, eval_rows, device)
            ]
            sums: dict[str, float] = {}
            for start in range(0, len(items), steps_per_mb):
                if watcher.should_stop(device):
                    log.info(f"evaluation at step {step} abandoned: SIGTERM")
                    return None
                piece = _fill_to_multiple(items[start : start + steps_per_mb], schedule_multiple)
                ref = reference_for([i.batch for i in piece])
                for key, value in evaluate(model, piece, objective, keys, forward, ref, device).items():
                    sums[key] = sums.get(key, 0.0) + value
            if not sums:
                return None
            metrics = {**_means(sums), "count": round(sums["count"])}
            result.evals.append({"step": step, **metrics})
            log.eval(step, metrics)
            return metrics

        def save(held_out: dict[str, float] | None = None) -> Path:
            """Save this step (``held_out``: the evaluation at it, which ranks it for
            ``checkpoint.keep_best``)."""
            with synced_params(model, optimizer):
                return save_synced(held_out)

        def save_synced(held_out: dict[str, float] | None) -> Path:
            if not _params_finite(model, device):
                raise TrainingDiverged(f"step {step}: the weights hold NaN/inf; not saving them")
            state = checkpoint.CheckpointState(
                step=step,
                consumed_rows=consumed_rows,
                scheduler=scheduler.state_dict(),
                objective=cfg.objective.type,
                config_yaml=to_yaml(cfg),
                world_size=world,
                base=base,
                eval=None if held_out is None else {k: v for k, v in held_out.items() if math.isfinite(v)},
            )
            path = checkpoint.save(cfg.save_dir, state, model, optimizer, cfg.checkpoint.keep, best)
            log.info(f"saved checkpoint {path}")
            return path

        run_eval()
        nonfinite_in_a_row = 0
        while step < cfg.run.train_steps and not watcher.should_stop(device):
            started = time.perf_counter()
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
            seconds = time.perf_counter() - started
            step += 1
            consumed_rows += cfg.data.global_batch_size
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if out.nonfinite else 0
            result.nonfinite_steps += int(out.nonfinite)
            tokens, groups, pairs = _global_work(batches, device)
            record = StepLog(
                step=step,
                consumed_rows=consumed_rows,
                losses={**_means(out.sums), **out.aux_losses},
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=out.grad_norm,
                seconds=seconds,
                tokens=tokens,
                groups=groups,
                flops=step_flops(active_params, tokens, pairs, model_cfg.num_layers, attn_dim, passes),
                devices=world,
                skipped=out.skipped,
                nonfinite=out.nonfinite,
                nonfinite_steps=result.nonfinite_steps,
                memory=memory_metrics(device),
            )
            result.history.append({"step": step, **record.metrics()})
            log.train(record)
            if out.nonfinite:
                limit = cfg.run.max_nonfinite_steps
                log.info(
                    f"step {step}: non-finite loss or gradient, update skipped "
                    f"({nonfinite_in_a_row} in a row, {result.nonfinite_steps} in this run; limit {limit})"
                )
                if nonfinite_in_a_row >= limit:
                    last = f"{saved_step}" if saved_step is not None else "none (nothing was saved)"
                    raise TrainingDiverged(
                        f"step {step}: {nonfinite_in_a_row} steps in a row had a non-finite loss or "
                        f"gradient (run.max_nonfinite_steps={limit}); stopping without saving. Last "
                        f"saved step: {last} in {cfg.save_dir}. Lower optimizer.lr or check the data"
                    )
                continue
            # keep_best: every evaluation is followed by a save that records it
            held_out = run_eval() if _due(cfg.run.eval_interval, step, cfg.run.train_steps) else None
            if _due(cfg.checkpoint.interval, step, cfg.run.train_steps) or (best and held_out is not None):
                result.checkpoint = save(held_out)
                saved_step = step
        # 7. the end: a SIGTERM before or during the final evaluation skips (the rest of) it
        result.steps = step
        result.preempted = watcher.should_stop(device)
        held_out = None
        if not result.preempted:
            held_out = run_eval()
            result.preempted = watcher.should_stop(device)
        # Before this run's first step there is nothing new to keep (and torch's Adam has no
        # state yet to save): the starting point is what a rerun starts from again.
        if step > start_step and saved_step != step:
            result.checkpoint = save(held_out)
        return result


def _due(interval: int, step: int, last_step: int) -> bool:
    """Whether a periodic action (every ``interval`` steps, 0: never) falls on ``step`` inside
    the run (the last step has its own evaluation and save)."""
    return bool(interval) and step % interval == 0 and step < last_step


def _best_policy(cfg: TrainConfig, metric_keys: list[str]) -> Any:
    """``checkpoint.keep_best`` as a :class:`~megatron_prefpack.training.checkpoint.BestPolicy`
    (None when off); ``checkpoint.best_metric`` must be one the objective evaluates."""
    from megatron_prefpack.training.checkpoint import BestPolicy

    ckpt = cfg.checkpoint
    if not ckpt.keep_best:
        return None
    evaluated = [key for key in metric_keys if not _is_count(key)]
    if ckpt.best_metric not in evaluated:
        raise config_error(
            cfg,
            "checkpoint.best_metric",
            f"{ckpt.best_metric!r} is not a held-out metric of objective {cfg.objective.type!r}; "
            f"choose from {', '.join(evaluated)}",
            related=["objective.type"],
        )
    return BestPolicy(ckpt.keep_best, ckpt.best_metric, ckpt.best_mode or "min")


def main() -> int:
    parser = argparse.ArgumentParser(prog="prefpack train")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
