"""``prefpack bench step``: measured model time for the same groups in each row layout.

``bench packing`` counts tokens and attention pairs; this runs the model. The groups of a
preprocessed dataset that fit a row in every layout are packed as ``prefpack``, ``duplicated``
and ``unpacked`` rows; each layout's rows go through the model (forward, the summed response
log-probs, backward) in micro-batches, once to warm up and then ``--repeats`` timed passes.
It prints seconds per pass over all the groups, groups/s, and the time ratios against the
unpacked and duplicated rows, next to the token ratios they should follow, and on CUDA each
layout's peak allocated GPU memory (``torch.cuda.max_memory_allocated`` after resetting the peak
at the layout's start: weights, gradients and that layout's activations; ``null`` on CPU). One
process; the device is CUDA when present (set ``--backend``), else CPU with the reference
attention. ``--dtype`` sets the parameter dtype (default: the preset's); a bf16/fp16 model runs
inside Megatron's ``Float16Module`` as in training. ``--plot FILE.png`` draws rows, time per
pass, computed tokens, groups/s and (on CUDA) peak memory as bar charts, each bar marked with its
ratios to the unpacked and duplicated rows (needs matplotlib: the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_prefpack.data import plotting
from megatron_prefpack.data.packing import LAYOUTS, GroupLengths, PackingConfig, pack
from megatron_prefpack.models.config import DTYPES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from megatron_prefpack.data.group_dataset import GroupDataset
    from megatron_prefpack.models.config import ModelConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--data", required=True, help="a `prefpack preprocess` output directory")
    parser.add_argument("--preset", default="demo-moe", help="model preset (default demo-moe)")
    parser.add_argument("--seq-len", type=int, default=256, help="row length L (default 256)")
    parser.add_argument("--groups", type=int, default=256, help="first N groups that fit (default 256)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per layout (default 3)")
    parser.add_argument("--backend", default="auto", help="attention backend (default auto)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="parameter dtype (default: the preset's params_dtype)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--plot", metavar="FILE.png", default=None, help="also draw the figures as bar charts"
    )


def _time_layout(
    model: Any, data: GroupDataset, lengths: GroupLengths, layout: str, args: argparse.Namespace, device: Any
) -> dict:
    import torch

    from megatron_prefpack.data.sampler import PackedRowDataset
    from megatron_prefpack.losses.logprobs import response_logprobs
    from megatron_prefpack.models.forward import model_forward

    plan = pack(lengths, PackingConfig(args.seq_len, layout, seed=0))
    rows = PackedRowDataset(plan, data.__getitem__, int(data.info.get("tokenizer", {}).get("pad_id", 0)))
    size = args.micro_batch_size
    batches = [
        rows.batch(list(range(s, min(s + size, plan.num_rows)))).to(device)
        for s in range(0, plan.num_rows, size)
    ]

    def one_pass() -> None:
        for batch in batches:
            logits = model_forward(model, batch, backend=args.backend)
            response_logprobs(
                logits, batch.labels, batch.response_slots, batch.num_responses
            ).sum().backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    one_pass()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - start)
    stats = plan.stats
    return {
        "rows": stats.rows,
        "computed_tokens": stats.row_tokens,
        "seconds_per_pass": float(np.median(seconds)),
        "seconds_all": seconds,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if on_cuda else None,
    }


def _inputs(args: argparse.Namespace) -> tuple[GroupDataset, GroupLengths, ModelConfig]:
    """The dataset, the lengths of its first ``--groups`` groups that fit a row in every layout,
    and the model config (vocabulary and positions grown to fit the data). Raises ``ValueError``
    or ``OSError`` naming the bad argument or file."""
    from megatron_prefpack.data.group_dataset import GroupDataset
    from megatron_prefpack.models.presets import preset
    from megatron_prefpack.training.data import group_lengths

    for flag in ("seq_len", "groups", "micro_batch_size", "repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    cfg = preset(args.preset)
    data = GroupDataset(args.data)
    lengths = group_lengths(data, np.arange(len(data)))
    fits = np.flatnonzero(lengths.fits_every_layout(args.seq_len))[: args.groups]
    if len(fits) == 0:
        raise ValueError(f"{args.data}: no group fits a row of {args.seq_len} tokens in every layout")
    vocab = int(data.info.get("tokenizer", {}).get("vocab_size", 0))
    cfg = dataclasses.replace(
        cfg,
        vocab_size=max(vocab, cfg.vocab_size),
        max_position_embeddings=max(cfg.max_position_embeddings, args.seq_len),
        params_dtype=args.dtype or cfg.params_dtype,
    )
    return data, lengths.select(fits), cfg


def _add_ratios(figures: dict[str, dict], groups: int) -> None:
    """Per layout: groups/s and the time and token ratios against unpacked and duplicated."""
    for entry in figures.values():
        entry["groups_per_s"] = groups / entry["seconds_per_pass"]
        for base in ("unpacked", "duplicated"):
            entry[f"time_ratio_vs_{base}"] = entry["seconds_per_pass"] / figures[base]["seconds_per_pass"]
            entry[f"tokens_ratio_vs_{base}"] = entry["computed_tokens"] / figures[base]["computed_tokens"]


def _format_table(result: dict[str, Any], repeats: int) -> str:
    lines = [
        f"{result['groups']} groups, rows of {result['seq_len']}, model {result['model']} on "
        f"{result['device']} ({result['dtype']}), median of {repeats} passes (forward + backward)",
        f"{'layout':<12}{'rows':>6}{'s/pass':>9}{'groups/s':>10}{'time x unp':>12}{'tok x unp':>11}"
        f"{'time x dup':>12}{'tok x dup':>11}{'peak GiB':>10}",
    ]
    for layout, e in result["layouts"].items():
        peak = e["peak_memory_bytes"]
        lines.append(
            f"{layout:<12}{e['rows']:>6}{e['seconds_per_pass']:>9.3f}{e['groups_per_s']:>10.1f}"
            f"{e['time_ratio_vs_unpacked']:>12.3f}{e['tokens_ratio_vs_unpacked']:>11.3f}"
            f"{e['time_ratio_vs_duplicated']:>12.3f}{e['tokens_ratio_vs_duplicated']:>11.3f}"
            f"{'-' if peak is None else f'{peak / 2**30:.2f}':>10}"
        )
    return "\n".join(lines)


def step_figure(result: dict[str, Any]) -> Figure:
    """Bar charts of a ``bench step`` result (as ``--json`` prints it): rows, seconds per pass,
    computed tokens, groups/s and, when measured (CUDA), peak memory; each bar is marked with
    its value and its ratios to the unpacked and duplicated rows."""
    layouts = result["layouts"]

    def panel(title: str, key: str, fmt: str, scale: float = 1.0) -> plotting.BarPanel:
        heights = {name: entry[key] * scale for name, entry in layouts.items()}
        return plotting.ratio_panel(title, heights, fmt, {"unpacked": "unp", "duplicated": "dup"})

    panels = [
        panel(f"rows of {result['seq_len']}", "rows", ",.0f"),
        panel("seconds per pass (fwd + bwd)", "seconds_per_pass", ".3f"),
        panel("computed tokens", "computed_tokens", ",.0f"),
        panel("groups per second", "groups_per_s", ".1f"),
    ]
    if all(entry["peak_memory_bytes"] is not None for entry in layouts.values()):
        panels.append(panel("peak memory (GiB)", "peak_memory_bytes", ".2f", 2.0**-30))
    title = (
        f"prefpack bench step: {result['model']} on {result['device']} ({result['dtype']}), "
        f"{result['groups']} groups, rows of {result['seq_len']} (x unp, x dup: ratio to unpacked, duplicated)"
    )
    return plotting.bar_figure(title, panels)


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.platform import distributed as platform

    try:
        plot = plotting.check_output(args.plot) if args.plot else None
        data, lengths, cfg = _inputs(args)
    except (OSError, ValueError, plotting.PlottingUnavailable) as err:
        print(f"prefpack bench step: error: {err}", file=sys.stderr)
        return 2
    platform.initialize()
    try:
        torch.manual_seed(0)
        model = build_model(cfg)
        if cfg.params_dtype != "float32":
            # As in training (model_setup.wrap_for_training): every weight, norms included, in
            # bf16/fp16, and float32 logits out.
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        device = next(model.parameters()).device
        figures = {layout: _time_layout(model, data, lengths, layout, args, device) for layout in LAYOUTS}
    finally:
        platform.destroy()
    _add_ratios(figures, lengths.num_groups)
    result = {
        "model": cfg.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": cfg.params_dtype,
        "device": str(device),
        "seq_len": args.seq_len,
        "groups": lengths.num_groups,
        "layouts": figures,
    }
    print(json.dumps(result, indent=1) if args.json else _format_table(result, args.repeats))
    if plot is not None:
        print(f"chart: {plotting.save_png(step_figure(result), plot)}", file=sys.stderr)
    return 0
