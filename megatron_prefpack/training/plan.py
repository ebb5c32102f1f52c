"""``prefpack plan``: memory per rank and step time of a training config on a GPU cluster.

For a training config (the YAML of ``prefpack train`` with the same overrides; the dataset need
not exist here) and a cluster (``--gpus N --gpu h100-80gb|h200-141gb|b200-192gb``) it prints
one row per pipeline stage (the ranks of a stage differ only in which data-parallel shard they
hold): exact parameter, gradient-buffer and optimizer bytes of that stage's rank (its model
built on the meta device, see :mod:`.plan_memory`), the activation bytes of the configured
row length, recompute and 1F1B schedule (a stated formula, approximate), the total and whether
it fits the GPU less ``--headroom-gib`` (CUDA context, NCCL buffers, fragmentation).

Step time: the FLOPs of one global batch (``training.metrics.step_flops``: 2 per active
parameter and computed token (MoE: top-k routed + shared experts), 4 x attention width per
visible (query, key) pair and layer, x3 for forward + backward (x2 for LoRA: a frozen weight
needs no weight-gradient GEMM), +1 forward for full recompute, +1 for an online or ``base``
DPO reference) over ``gpus x peak x --mfu``, stretched by the pipeline
bubble ``(PP - 1) / (m x V)``. Tokens and attention pairs per row come from packing the
config's dataset with the config's layout when it exists, else the dataset of ``--data DIR``
(another preprocessed dataset), else full rows of causal attention; the output says which.
Peaks (dense bf16, TFLOP/s; FP8 x2): H100 989, H200 989, B200 2250.

``--search`` enumerates layouts for ``--gpus`` (TP 1/2/4/8 dividing the heads, PP dividing the
layers or with an uneven first/last split, EP dividing the experts, CP 1/2/4/8, distributed
optimizer on, recompute none/selective/full) and lists those that fit, fastest first, with the
YAML to paste. ``--json`` prints one JSON object (``--search``: a list of them, fastest first).
Bad layouts exit 2 naming what does not divide.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from megatron_prefpack.training.config import ConfigError, TrainConfig

EXIT_BAD_INPUT = 2
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    """What ``nvidia-smi`` reports as total memory."""
    bf16_tflops: float
    """Dense bf16 peak; FP8 is twice that."""


GPUS = {
    "h100-80gb": Gpu("h100-80gb", 81559 * MIB, 989.0),
    "h200-141gb": Gpu("h200-141gb", 143771 * MIB, 989.0),
    "b200-192gb": Gpu("b200-192gb", 183359 * MIB, 2250.0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, help="YAML training config (as for prefpack train)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides")
    parser.add_argument("--gpus", type=int, required=True, help="world size (GPUs in the job)")
    parser.add_argument("--gpu", choices=sorted(GPUS), required=True, help="GPU model")
    parser.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation (default 0.35)")
    parser.add_argument(
        "--headroom-gib",
        type=float,
        default=6.0,
        help="GPU memory kept free (CUDA context, NCCL, fragmentation)",
    )
    parser.add_argument("--data", default=None, help="preprocessed dataset to take row statistics from")
    parser.add_argument("--search", action="store_true", help="enumerate layouts that fit, fastest first")
    parser.add_argument("--top", type=int, default=10, help="layouts listed by --search (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# ----------------------------------------------------------------------------- data statistics


@dataclass(frozen=True)
class RowStats:
    """Per-row work: tokens the model computes (the row length), real tokens, attention pairs."""

    source: str
    row_length: int
    real_tokens: float
    attention_pairs: float


def row_stats(cfg: TrainConfig, data: str | None) -> RowStats:
    """Packing statistics of the config's dataset (or ``data``) under its layout; full causal
    rows when neither dataset exists."""
    from pathlib import Path

    import numpy as np

    from megatron_prefpack.data.group_dataset import GroupDataset
    from megatron_prefpack.data.packing import PackingConfig, causal_attention_pairs, pack, padded_row_length
    from megatron_prefpack.training.data import group_lengths

    par = cfg.parallel
    length = padded_row_length(cfg.data.seq_len, par.tensor, par.context, par.sequence_parallel)
    path = next((p for p in (cfg.data.path, data) if p and Path(p).is_dir()), None)
    if path is None:
        pairs = float(causal_attention_pairs(length))
        return RowStats("full rows of causal attention (no dataset)", length, float(length), pairs)
    dataset = GroupDataset(path)
    first_only = cfg.objective.type == "sft" and cfg.objective.sft.responses == "first"
    lengths = group_lengths(dataset, np.arange(len(dataset), dtype=np.int64), first_only)
    packing = PackingConfig(
        seq_len=cfg.data.seq_len,
        layout=cfg.data.layout,
        sort_by_length=cfg.data.sort_by_length,
        seed=cfg.run.seed,
        tensor_parallel=par.tensor,
        context_parallel=par.context,
        sequence_parallel=par.sequence_parallel,
        skip_too_long=True,
    )
    stats = pack(lengths, packing).stats
    if not stats.rows:
        raise ConfigError(f"{path}: no group fits a row of {cfg.data.seq_len} tokens")
    return RowStats(
        f"dataset {path} ({cfg.data.layout}, {stats.rows:,} rows, padding {stats.padding_fraction:.1%})",
        length,
        stats.real_tokens / stats.rows,
        stats.attention_pairs / stats.rows,
    )


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ModelTotals:
    total: int
    active: int
    routed: int
    """Routed-expert parameters (all experts), for the search's quick lower bound."""
    trainable: int
    """What the optimizer updates: a LoRA model's adapters (and reward head), else all."""


def model_totals(cfg: TrainConfig, model_cfg: Any) -> ModelTotals:
    from megatron_prefpack.training.plan_memory import total_and_active_parameters

    total, active, trainable = total_and_active_parameters(cfg, model_cfg)
    moe = model_cfg.moe
    routed = 0 if moe is None else round((total - active) / (1 - moe.top_k / moe.num_experts))
    return ModelTotals(total, active, routed, trainable)


def step_time(
    cfg: TrainConfig,
    model_cfg: Any,
    totals: ModelTotals,
    rows: RowStats,
    gpus: int,
    gpu: Gpu,
    mfu: float,
    dp: int,
) -> dict[str, Any]:
    """FLOPs, time and throughput of one global batch (see the module docstring)."""
    from megatron_prefpack.training.metrics import attention_width, step_flops

    batch = cfg.data.global_batch_size
    passes = 3.0 if model_cfg.lora is None else 2.0
    passes += 1.0 if cfg.performance.recompute_granularity == "full" else 0.0
    passes += 1.0 if cfg.reference.mode in ("online", "base") else 0.0
    flops = step_flops(
        totals.active,
        batch * rows.row_length,
        round(batch * rows.attention_pairs),
        model_cfg.num_layers,
        attention_width(model_cfg),
        passes,
    )
    peak = gpu.bf16_tflops * (2 if cfg.performance.fp8 else 1) * 1e12
    microbatches = batch // (cfg.data.micro_batch_size * dp)
    bubble = (cfg.parallel.pipeline - 1) / (microbatches * (cfg.parallel.virtual_pipeline or 1))
    seconds = flops / (gpus * peak * mfu) * (1 + bubble)
    return {
        "flops": flops,
        "passes": passes,
        "peak_tflops": peak / 1e12,
        "mfu": mfu,
        "microbatches": microbatches,
        "bubble": bubble,
        "step_time_s": seconds,
        "tokens_per_s": batch * rows.real_tokens / seconds,
        "computed_tokens_per_s": batch * rows.row_length / seconds,
    }


def _stage_ranks(world: int, pipeline: int) -> list[int]:
    """The global rank of every pipeline stage with tensor, context and data rank 0 (Megatron's
    order ``tp-cp-ep-dp-pp``: the pipeline rank varies slowest)."""
    return [stage * (world // pipeline) for stage in range(pipeline)]


def _layer_signature(cfg: TrainConfig, model_cfg: Any) -> list[tuple[Any, ...]] | None:
    """Per stage, what decides its parameters (its layers' kinds, embedding, output), when the
    split is first/last/even without virtual stages; None otherwise (every stage is built)."""
    par = cfg.parallel
    if par.pipeline_layout is not None or par.virtual_pipeline is not None:
        return None
    from megatron_prefpack.training.config import chunk_layer_counts

    pp = par.pipeline
    counts = chunk_layer_counts(cfg, model_cfg.num_layers)
    pattern = model_cfg.moe_layer_pattern()
    starts = list(itertools.accumulate([0, *counts]))
    return [(tuple(pattern[starts[s] : starts[s + 1]]), s == 0, s == pp - 1) for s in range(pp)]


def plan(
    cfg: TrainConfig,
    model_cfg: Any,
    gpus: int,
    gpu: Gpu,
    headroom_gib: float,
    mfu: float,
    totals: ModelTotals,
    rows: RowStats,
) -> dict[str, Any]:
    """The plan of ``cfg`` on ``gpus`` x ``gpu``: per stage bytes, fits, step time (JSON-ready)."""
    from megatron_prefpack.training.config import check_parallel_layout
    from megatron_prefpack.training.plan_memory import rank_static, stage_activations

    dp = check_parallel_layout(cfg, gpus, model_cfg)
    microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
    signature = _layer_signature(cfg, model_cfg)
    built: dict[Any, Any] = {}
    ranks = []
    budget = gpu.memory_bytes - headroom_gib * GIB
    first_layer = 0  # stages hold consecutive layers unless the pipeline is interleaved
    for stage, rank in enumerate(_stage_ranks(gpus, cfg.parallel.pipeline)):
        key = signature[stage] if signature is not None else stage
        if key not in built:
            print(f"[plan] building stage {stage} (rank {rank}) on the meta device", file=sys.stderr)
            built[key] = rank_static(cfg, model_cfg, gpus, rank)
        static = built[key]
        act = stage_activations(cfg, model_cfg, static.shape, stage, microbatches)
        # An online reference is a frozen copy of this rank's chunks (no DDP buffers, no optimizer).
        reference = _unpadded_param_bytes(static, model_cfg) if cfg.reference.mode == "online" else 0
        total = static.param_bytes + static.grad_bytes + static.optimizer_bytes + int(act.peak) + reference
        ranks.append(
            {
                "rank": rank,
                "stage": stage,
                "ranks_sharing": gpus // cfg.parallel.pipeline,
                "layers": len(static.shape.layers),
                "first_layer": first_layer if cfg.parallel.virtual_pipeline is None else None,
                "embedding": static.shape.embedding,
                "output": static.shape.output,
                "params": static.params,
                "param_bytes": static.param_bytes,
                "grad_bytes": static.grad_bytes,
                "optimizer_bytes": static.optimizer_bytes,
                "reference_bytes": reference,
                "activation_bytes": int(act.peak),
                "activation_bytes_per_microbatch": int(act.per_microbatch),
                "in_flight_chunks": act.in_flight,
                "total_bytes": total,
                "fits": total <= budget,
            }
        )
        first_layer += len(static.shape.layers)
    timing = step_time(cfg, model_cfg, totals, rows, gpus, gpu, mfu, dp)
    return {
        "fits": all(r["fits"] for r in ranks),
        "step_time_s": timing["step_time_s"],
        "gpu": gpu.name,
        "gpus": gpus,
        "gpu_memory_bytes": gpu.memory_bytes,
        "headroom_bytes": int(headroom_gib * GIB),
        "layout": _layout(cfg, dp),
        "model": {
            "name": model_cfg.name,
            "total_params": totals.total,
            "active_params": totals.active,
            "trainable_params": totals.trainable,
        },
        "rows": dataclasses.asdict(rows),
        "timing": timing,
        "ranks": ranks,
    }


def _unpadded_param_bytes(static: Any, model_cfg: Any) -> int:
    from megatron_prefpack.models.config import torch_dtype

    return static.params * (torch_dtype(model_cfg.params_dtype).itemsize)


def _layout(cfg: TrainConfig, dp: int) -> dict[str, Any]:
    par, perf = cfg.parallel, cfg.performance
    return {
        "tensor": par.tensor,
        "sequence_parallel": par.sequence_parallel,
        "pipeline": par.pipeline,
        "virtual_pipeline": par.virtual_pipeline,
        "first_stage_layers": par.first_stage_layers,
        "last_stage_layers": par.last_stage_layers,
        "pipeline_layout": par.pipeline_layout,
        "context": par.context,
        "expert": par.expert,
        "data": dp,
        "distributed_optimizer": par.distributed_optimizer,
        "recompute_granularity": perf.recompute_granularity,
        "recompute_method": perf.recompute_method,
        "recompute_num_layers": perf.recompute_num_layers,
        "recompute_modules": perf.recompute_modules,
    }


# ----------------------------------------------------------------------------- search

_RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def _pipeline_splits(layers: int, pp: int) -> list[tuple[int | None, int | None]]:
    """(first_stage_layers, last_stage_layers) for ``pp`` stages: an even split when ``pp``
    divides ``layers``, else the middle stages take ``ceil(layers / pp)`` and the first and
    last share the rest (the first, which holds the embedding, the smaller part)."""
    if layers % pp == 0:
        return [(None, None)]
    if pp == 2:
        return [(layers // 2, layers - layers // 2)]
    for share in range(math.ceil(layers / pp), 0, -1):
        rest = layers - share * (pp - 2)
        if rest >= 2:
            return [(rest // 2, rest - rest // 2)]
    return []


def _candidates(cfg: TrainConfig, model_cfg: Any, gpus: int) -> list[TrainConfig]:
    """Every layout of the search (module docstring) that passes ``check_parallel_layout``."""
    from megatron_prefpack.training.config import check_parallel_layout

    heads = model_cfg.num_attention_heads
    experts = model_cfg.moe.num_experts if model_cfg.moe else 1
    out = []
    for tp, cp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
        if heads % tp:
            continue
        for pp in (p for p in range(1, min(gpus, model_cfg.num_layers) + 1) if gpus % p == 0):
            for (first, last), ep in itertools.product(
                _pipeline_splits(model_cfg.num_layers, pp),
                (e for e in range(1, experts + 1) if experts % e == 0),
            ):
                par = dataclasses.replace(
                    cfg.parallel,
                    tensor=tp,
                    sequence_parallel=tp > 1,
                    pipeline=pp,
                    virtual_pipeline=None,
                    first_stage_layers=first,
                    last_stage_layers=last,
                    pipeline_layout=None,
                    context=cp,
                    expert=ep,
                    distributed_optimizer=True,
                )
                candidate = dataclasses.replace(cfg, parallel=par)
                try:
                    check_parallel_layout(candidate, gpus, model_cfg)
                except ConfigError:
                    continue
                out.append(candidate)
    return out


def _static_lower_bound(cfg: TrainConfig, model_cfg: Any, totals: ModelTotals, gpus: int) -> float:
    """Bytes every rank needs at least (bf16/fp32 params + fp32 grads of its share of the
    weights, optimizer state ignored; LoRA: the frozen weights have no gradients): layouts
    above the budget are not built."""
    from megatron_prefpack.models.config import torch_dtype

    par = cfg.parallel
    grads = 0 if model_cfg.lora is not None else (4 if cfg.ddp.grad_reduce_in_fp32 else 2)
    per_element = torch_dtype(model_cfg.params_dtype).itemsize + grads
    dense = (totals.total - totals.routed) / (par.tensor * par.pipeline)
    routed = totals.routed / (par.tensor * par.pipeline * par.expert)
    return (dense + routed) * per_element


def search(
    cfg: TrainConfig,
    model_cfg: Any,
    gpus: int,
    gpu: Gpu,
    headroom_gib: float,
    mfu: float,
    totals: ModelTotals,
    rows: RowStats,
) -> list[dict[str, Any]]:
    """The plans of every searched layout and recompute choice that fits, fastest first (then
    the smallest peak memory)."""
    budget = gpu.memory_bytes - headroom_gib * GIB
    fitting = []
    candidates = _candidates(cfg, model_cfg, gpus)
    print(f"[plan] search: {len(candidates)} layouts", file=sys.stderr)
    for candidate in candidates:
        if _static_lower_bound(candidate, model_cfg, totals, gpus) > budget:
            continue
        for settings in _RECOMPUTE.values():
            perf = dataclasses.replace(
                candidate.performance,
                recompute_granularity=settings.get("recompute_granularity"),
                recompute_method=settings.get("recompute_method"),
                recompute_num_layers=settings.get("recompute_num_layers"),
                recompute_modules=None,
            )
            result = plan(
                dataclasses.replace(candidate, performance=perf),
                model_cfg,
                gpus,
                gpu,
                headroom_gib,
                mfu,
                totals,
                rows,
            )
            if result["fits"]:
                fitting.append(result)
                break  # less recompute is faster; heavier recompute only adds time
    fitting.sort(key=lambda r: (r["step_time_s"], max(x["total_bytes"] for x in r["ranks"])))
    return fitting


# ----------------------------------------------------------------------------- output


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def layout_line(layout: dict[str, Any]) -> str:
    parts = [f"TP{layout['tensor']}" + (" SP" if layout["sequence_parallel"] else "")]
    pp = f"PP{layout['pipeline']}"
    if layout["virtual_pipeline"]:
        pp += f" VPP{layout['virtual_pipeline']}"
    if layout["first_stage_layers"] or layout["last_stage_layers"]:
        pp += f" (first {layout['first_stage_layers']}, last {layout['last_stage_layers']})"
    if layout["pipeline_layout"]:
        pp += f" ({layout['pipeline_layout']})"
    parts += [pp, f"EP{layout['expert']}", f"CP{layout['context']}", f"DP{layout['data']}"]
    if layout["distributed_optimizer"]:
        parts.append("distributed optimizer")
    recompute = layout["recompute_granularity"] or "none"
    if recompute == "full":
        recompute += f" ({layout['recompute_method']}, {layout['recompute_num_layers']})"
    elif recompute == "selective":
        recompute += f" ({', '.join(layout['recompute_modules'] or ['core_attn'])})"
    return ", ".join(parts) + f"; recompute {recompute}"


def _trainable_note(model: dict[str, Any]) -> str:
    """``, 21.3 M trainable (LoRA)`` when fewer than all parameters train."""
    trainable = model.get("trainable_params", model["total_params"])
    return "" if trainable >= model["total_params"] else f", {trainable / 1e6:.1f} M trainable (LoRA)"


def format_plan(result: dict[str, Any]) -> str:
    t = result["timing"]
    lines = [
        f"{result['model']['name']} ({result['model']['total_params'] / 1e9:.1f} B parameters, "
        f"{result['model']['active_params'] / 1e9:.1f} B active{_trainable_note(result['model'])}) on "
        f"{result['gpus']} x {result['gpu']}",
        f"layout: {layout_line(result['layout'])}",
        f"rows: {result['rows']['source']}",
        "",
        f"{'stage':>5} {'ranks':>5} {'layers':>9} {'params':>8} {'weights':>8} {'grads':>7} {'optim':>7} "
        f"{'activ':>7} {'x mb':>5} {'total':>7}  fits",
    ]
    for r in result["ranks"]:
        first = r["first_layer"]
        if not r["layers"]:
            layers = "-"
        elif first is None:
            layers = f"{r['layers']} l."
        else:
            layers = f"{first}-{first + r['layers'] - 1}"
        extras = ("E" if r["embedding"] else "") + ("L" if r["output"] else "")
        weights = r["param_bytes"] + r["reference_bytes"]
        lines.append(
            f"{r['stage']:>5} {r['ranks_sharing']:>5} {layers + extras:>9} {r['params'] / 1e9:>7.2f}B "
            f"{_gib(weights):>8} {_gib(r['grad_bytes']):>7} {_gib(r['optimizer_bytes']):>7} "
            f"{_gib(r['activation_bytes']):>7} {r['in_flight_chunks']:>5} {_gib(r['total_bytes']):>7}  "
            f"{'yes' if r['fits'] else 'NO'}"
        )
    budget = result["gpu_memory_bytes"] - result["headroom_bytes"]
    lines += [
        f"(GiB; E = embedding, L = output layer + loss; x mb = micro-batches (chunks) in flight"
        f"{'; weights include the online reference' if any(r['reference_bytes'] for r in result['ranks']) else ''}; budget {_gib(budget)} GiB = {_gib(result['gpu_memory_bytes'])} "
        f"less {_gib(result['headroom_bytes'])} headroom)",
        f"fits: {'yes' if result['fits'] else 'NO'}; step time {t['step_time_s']:.2f} s "
        f"({t['flops'] / 1e15:.1f} PFLOP per step, {t['passes']:.0f} passes, MFU {t['mfu']:.2f} of "
        f"{t['peak_tflops']:.0f} TFLOP/s, pipeline bubble {t['bubble']:.1%} over {t['microbatches']} "
        f"micro-batches); {t['tokens_per_s']:,.0f} real tokens/s",
    ]
    return "\n".join(lines)


def yaml_settings(layout: dict[str, Any]) -> str:
    """The ``parallel`` / ``performance`` keys of a searched layout, to paste into the config."""
    parallel = {
        k: layout[k]
        for k in (
            "tensor",
            "sequence_parallel",
            "pipeline",
            "first_stage_layers",
            "last_stage_layers",
            "context",
            "expert",
            "distributed_optimizer",
        )
    }
    performance = {
        k: layout[k] for k in ("recompute_granularity", "recompute_method", "recompute_num_layers")
    }
    lines = ["parallel:"] + [f"  {k}: {_yaml(v)}" for k, v in parallel.items() if v is not None]
    lines += ["performance:"] + [f"  {k}: {_yaml(v)}" for k, v in performance.items()]
    return "\n".join(lines)


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def format_search(results: list[dict[str, Any]], top: int) -> str:
    if not results:
        return "no searched layout fits"
    lines = [f"{len(results)} layouts fit; the fastest {min(top, len(results))}:", ""]
    for i, result in enumerate(results[:top], 1):
        peak = max(r["total_bytes"] for r in result["ranks"])
        lines += [
            f"{i}. {result['timing']['step_time_s']:.2f} s/step, peak {_gib(peak)} GiB: {layout_line(result['layout'])}",
            yaml_settings(result["layout"]),
            "",
        ]
    return "\n".join(lines).rstrip()


def run(args: argparse.Namespace) -> int:
    from megatron_prefpack.data.group_dataset import DatasetError
    from megatron_prefpack.training.config import model_config, read_config

    start = time.monotonic()
    try:
        if args.gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
        if not 0 < args.mfu <= 1 or not args.headroom_gib >= 0:
            raise ConfigError("--mfu must be in (0, 1] and --headroom-gib >= 0")
        cfg = read_config(args.config, [*args.set, *args.overrides])
        model_cfg = model_config(cfg)
        rows = row_stats(cfg, args.data)
        gpu = GPUS[args.gpu]
        print("[plan] counting the model's parameters on the meta device", file=sys.stderr)
        totals = model_totals(cfg, model_cfg)
        if args.search:
            results = search(cfg, model_cfg, args.gpus, gpu, args.headroom_gib, args.mfu, totals, rows)
        else:
            result = plan(cfg, model_cfg, args.gpus, gpu, args.headroom_gib, args.mfu, totals, rows)
    except (ConfigError, DatasetError) as err:
        print(f"prefpack plan: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    elapsed = time.monotonic() - start
    if args.search:
        print(json.dumps(results[: args.top], indent=2) if args.json else format_search(results, args.top))
    else:
        print(json.dumps(result, indent=2) if args.json else format_plan(result))
    print(f"[plan] planned in {elapsed:.1f} s", file=sys.stderr)
    return 0
