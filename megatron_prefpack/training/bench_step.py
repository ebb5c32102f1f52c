"""``prefpack bench step``: measured model time for the same groups in each row layout.

``bench packing`` counts tokens and attention pairs; this runs the model. The groups of a
preprocessed dataset that fit a row in every layout are packed as ``prefpack``, ``duplicated``
and ``unpacked`` rows; each layout's rows go through the model (forward, the summed response
log-probs, backward) in micro-batches, once to warm up and then ``--repeats`` timed passes.
It prints seconds per pass over all the groups, groups/s, and the time ratios against the
unpacked and duplicated rows, next to the token ratios they should follow. One process; the
device is CUDA when present (set ``--backend``), else CPU with the reference attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np

from megatron_prefpack.data.packing import LAYOUTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a `prefpack preprocess` output directory")
    parser.add_argument("--preset", default="demo-moe", help="model preset (default demo-moe)")
    parser.add_argument("--seq-len", type=int, default=256, help="row length L (default 256)")
    parser.add_argument("--groups", type=int, default=256, help="first N groups that fit (default 256)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per layout (default 3)")
    parser.add_argument("--backend", default="auto", help="attention backend (default auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _time_layout(
    model: Any, data: Any, lengths: Any, layout: str, args: argparse.Namespace, device: Any
) -> dict:
    import torch

    from megatron_prefpack.data.packing import PackingConfig, pack
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
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_prefpack.data.group_dataset import GroupDataset
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.models.presets import preset
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training.data import group_lengths

    data = GroupDataset(args.data)
    lengths = group_lengths(data, np.arange(len(data)))
    fits = np.flatnonzero(lengths.group_tokens("duplicated") <= args.seq_len)[: args.groups]
    if len(fits) == 0:
        print(f"prefpack bench step: no group of {args.data} fits a row of {args.seq_len} tokens")
        return 2
    lengths = lengths.select(fits)
    vocab = int(data.info.get("tokenizer", {}).get("vocab_size", 0))
    cfg = preset(args.preset)
    cfg = dataclasses.replace(
        cfg,
        vocab_size=max(vocab, cfg.vocab_size),
        max_position_embeddings=max(cfg.max_position_embeddings, args.seq_len),
    )
    platform.initialize()
    try:
        torch.manual_seed(0)
        model = build_model(cfg)
        device = next(model.parameters()).device
        figures = {layout: _time_layout(model, data, lengths, layout, args, device) for layout in LAYOUTS}
    finally:
        platform.destroy()
    groups = len(fits)
    for entry in figures.values():
        entry["groups_per_s"] = groups / entry["seconds_per_pass"]
        for base in ("unpacked", "duplicated"):
            entry[f"time_ratio_vs_{base}"] = entry["seconds_per_pass"] / figures[base]["seconds_per_pass"]
            entry[f"tokens_ratio_vs_{base}"] = entry["computed_tokens"] / figures[base]["computed_tokens"]
    result = {
        "model": cfg.name,
        "device": str(device),
        "seq_len": args.seq_len,
        "groups": groups,
        "layouts": figures,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"{groups} groups, rows of {args.seq_len}, model {cfg.name} on {device}, "
        f"median of {args.repeats} passes (forward + backward)"
    )
    print(
        f"{'layout':<12}{'rows':>6}{'s/pass':>9}{'groups/s':>10}{'time x unp':>12}{'tok x unp':>11}{'time x dup':>12}{'tok x dup':>11}"
    )
    for layout, e in figures.items():
        print(
            f"{layout:<12}{e['rows']:>6}{e['seconds_per_pass']:>9.3f}{e['groups_per_s']:>10.1f}"
            f"{e['time_ratio_vs_unpacked']:>12.3f}{e['tokens_ratio_vs_unpacked']:>11.3f}"
            f"{e['time_ratio_vs_duplicated']:>12.3f}{e['tokens_ratio_vs_duplicated']:>11.3f}"
        )
    return 0
