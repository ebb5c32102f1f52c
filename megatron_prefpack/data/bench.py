"""``prefpack bench packing``: preference packing against the two baselines on a JSONL file of
preference records, from token counts alone (no model; ``prefpack bench step`` times a model).

For every layout it reports rows of length L, the padding fraction, tokens computed per
group (rows * L / groups, what a dense per-row model pass costs), real (non-pad) tokens per
group, and attention query-key pairs per group (the causal-attention FLOP proxy: the pairs
a varlen kernel computes, exactly the True entries of ``layout.dense_mask`` on real tokens),
with ratios against ``unpacked``. ``unpacked_sorted`` is the paper's batch sorting: the
unpacked rows length-sorted and each micro-batch padded only to its longest row.
``--plot FILE.png`` draws the same figures as bar charts, each bar marked with its ratio to
``unpacked`` (needs matplotlib: the ``plot`` extra).

All layouts are compared on the same groups: those that fit a row in every layout
(:meth:`GroupLengths.fits_every_layout`). The others are counted per layout and excluded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_prefpack.data import plotting
from megatron_prefpack.data.packing import LAYOUTS, GroupLengths, PackingConfig, pack

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--data", required=True, help="JSONL(.gz) file of preference records")
    parser.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model, tokenizer.json or directory"
    )
    parser.add_argument("--seq-len", type=int, required=True, help="row length L")
    parser.add_argument("--max-prompt-len", type=int, default=None, help="keep the last N prompt tokens")
    parser.add_argument("--max-response-len", type=int, default=None, help="keep the first N response tokens")
    parser.add_argument("--chat-template", default=None, help="for chat records (see `prefpack preprocess`)")
    parser.add_argument(
        "--micro-batch-size", type=int, default=8, help="rows per micro-batch for unpacked_sorted (default 8)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--plot", metavar="FILE.png", default=None, help="also draw the figures as bar charts"
    )


def compare_layouts(
    lengths: GroupLengths, seq_len: int, micro_batch_size: int = 8, seed: int = 1234
) -> dict[str, Any]:
    """Figures of the three layouts (and ``unpacked_sorted``) on the groups of ``lengths``
    that fit a row of ``seq_len`` in every layout. Returns a JSON-ready dict."""
    too_long = {layout: int((lengths.group_tokens(layout) > seq_len).sum()) for layout in LAYOUTS}
    fits = np.flatnonzero(lengths.fits_every_layout(seq_len))
    common = lengths.select(fits)
    result: dict[str, Any] = {
        "seq_len": seq_len,
        "groups_read": lengths.num_groups,
        "groups": common.num_groups,
        "responses": int(common.num_responses.sum()),
        "too_long": too_long,
        "groups_excluded": lengths.num_groups - common.num_groups,
        "layouts": {},
    }
    if common.num_groups == 0:
        return result
    figures = result["layouts"]
    for layout in LAYOUTS:
        stats = pack(common, PackingConfig(seq_len, layout, seed=seed)).stats
        figures[layout] = _figures(
            stats.rows, stats.row_tokens, stats.real_tokens, stats.attention_pairs, common
        )
    sorted_figures = _unpacked_sorted(common, seq_len, micro_batch_size, seed)
    if sorted_figures is not None:
        figures["unpacked_sorted"] = sorted_figures
    base = figures["unpacked"]
    for entry in figures.values():
        entry["tokens_ratio_vs_unpacked"] = entry["tokens_per_group"] / base["tokens_per_group"]
        entry["real_tokens_ratio_vs_unpacked"] = (
            entry["real_tokens_per_group"] / base["real_tokens_per_group"]
        )
        entry["attention_pairs_ratio_vs_unpacked"] = (
            entry["attention_pairs_per_group"] / base["attention_pairs_per_group"]
        )
    return result


def _figures(
    rows: int, computed_tokens: int, real_tokens: int, pairs: int, lengths: GroupLengths
) -> dict[str, Any]:
    groups = lengths.num_groups
    return {
        "rows": rows,
        "padding_fraction": 1.0 - real_tokens / computed_tokens,
        "tokens_per_group": computed_tokens / groups,
        "real_tokens_per_group": real_tokens / groups,
        "attention_pairs_per_group": pairs / groups,
    }


def _unpacked_sorted(
    lengths: GroupLengths, seq_len: int, micro_batch_size: int, seed: int
) -> dict[str, Any] | None:
    """Length-sorted unpacked rows, each micro-batch cut to its longest row. ``None`` unless every
    group has the same K and ``micro_batch_size`` is a multiple of K (as the sampler requires)."""
    ks = np.unique(lengths.num_responses)
    if len(ks) != 1 or micro_batch_size % int(ks[0]):
        return None
    plan = pack(lengths, PackingConfig(seq_len, "unpacked", sort_by_length=True, seed=seed))
    computed = 0
    for start in range(0, plan.num_rows, micro_batch_size):
        micro = plan.row_tokens[start : start + micro_batch_size]
        computed += len(micro) * int(micro.max())
    stats = plan.stats
    return _figures(stats.rows, computed, stats.real_tokens, stats.attention_pairs, lengths)


def load_lengths(
    data: str,
    tokenizer_path: str,
    max_prompt_len: int | None,
    max_response_len: int | None,
    chat_template: str | None,
) -> tuple[GroupLengths, dict[str, int]]:
    """Tokenize every record of ``data`` (as ``prefpack preprocess`` does) and return the
    groups' lengths plus truncation counts."""
    from megatron_prefpack.data.chat_templates import resolve_chat_template
    from megatron_prefpack.data.groups import truncate
    from megatron_prefpack.data.preprocess import tokenize_record
    from megatron_prefpack.data.records import iter_records
    from megatron_prefpack.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    template = resolve_chat_template(chat_template, tokenizer.chat_template)
    prompts: list[int] = []
    responses: list[list[int]] = []
    cut = {"prompts_truncated": 0, "responses_truncated": 0}
    for i, (_, record) in enumerate(iter_records(data)):
        group = tokenize_record(record, tokenizer, template, group_id=i)
        group, truncation = truncate(group, max_prompt_len, max_response_len)
        cut["prompts_truncated"] += truncation.prompt_tokens > 0
        cut["responses_truncated"] += truncation.responses
        prompts.append(len(group.prompt))
        responses.append([len(r) for r in group.responses])
    return GroupLengths.from_arrays(prompts, responses), cut


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['data']}: {result['groups']:,} groups, {result['responses']:,} responses, "
        f"row length {result['seq_len']}",
        "too long for a row: "
        + ", ".join(f"{k} {v:,}" for k, v in result["too_long"].items())
        + f" ({result['groups_excluded']:,} groups excluded from all layouts)",
        f"truncated: {result['prompts_truncated']:,} prompts, {result['responses_truncated']:,} responses",
        "",
        f"{'layout':<16}{'rows':>9}{'padding':>9}{'tok/group':>11}{'real/group':>12}{'pairs/group':>14}"
        f"{'tok x':>8}{'real x':>8}{'pairs x':>9}",
    ]
    for name, f in result["layouts"].items():
        lines.append(
            f"{name:<16}{f['rows']:>9,}{100 * f['padding_fraction']:>8.2f}%{f['tokens_per_group']:>11.1f}"
            f"{f['real_tokens_per_group']:>12.1f}{f['attention_pairs_per_group']:>14,.0f}"
            f"{f['tokens_ratio_vs_unpacked']:>8.3f}{f['real_tokens_ratio_vs_unpacked']:>8.3f}"
            f"{f['attention_pairs_ratio_vs_unpacked']:>9.3f}"
        )
    if "unpacked_sorted" not in result["layouts"] and result["layouts"]:
        lines.append(
            "(unpacked_sorted needs the same K in every group and --micro-batch-size a multiple of K)"
        )
    lines.append(
        "x = ratio against unpacked (rows padded to L); unpacked_sorted pads each micro-batch to its longest row"
    )
    return "\n".join(lines)


def packing_figure(result: dict[str, Any]) -> Figure:
    """Bar charts of :func:`compare_layouts`' figures (``result`` as ``--json`` prints it), one
    panel per column of the table, each bar marked with its value and its ratio to unpacked
    (padding with its percentage alone)."""
    layouts = result["layouts"]

    def panel(title: str, key: str, fmt: str) -> plotting.BarPanel:
        heights = {name: entry[key] for name, entry in layouts.items()}
        return plotting.ratio_panel(title, heights, fmt, {"unpacked": "unp"})

    padding = {name: 100 * entry["padding_fraction"] for name, entry in layouts.items()}
    panels = [
        panel(f"rows of {result['seq_len']}", "rows", ","),
        plotting.ratio_panel("padding (%)", padding, ".2f", {}),
        panel("computed tokens per group", "tokens_per_group", ".1f"),
        panel("real tokens per group", "real_tokens_per_group", ".1f"),
        panel("attention pairs per group", "attention_pairs_per_group", ",.0f"),
    ]
    title = (
        f"prefpack bench packing: {Path(result['data']).name}, {result['groups']:,} groups, "
        f"rows of {result['seq_len']} (x unp: ratio to unpacked)"
    )
    return plotting.bar_figure(title, panels)


def run(args: argparse.Namespace) -> int:
    from megatron_prefpack.data.records import InvalidRecord
    from megatron_prefpack.data.tokenizers import TokenizerError

    if args.seq_len < 1 or args.micro_batch_size < 1:
        print("error: --seq-len and --micro-batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        plot = plotting.check_output(args.plot) if args.plot else None
    except (plotting.PlottingUnavailable, ValueError) as e:
        print(f"error: --plot: {e}", file=sys.stderr)
        return 2
    try:
        lengths, cut = load_lengths(
            args.data, args.tokenizer, args.max_prompt_len, args.max_response_len, args.chat_template
        )
    except (InvalidRecord, TokenizerError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {
        "data": args.data,
        "tokenizer": args.tokenizer,
        **cut,
        **compare_layouts(lengths, args.seq_len, args.micro_batch_size, args.seed),
    }
    if result["groups"] == 0:
        print(f"error: no group of {args.data} fits a row of {args.seq_len} tokens", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if plot is not None:
        print(f"chart: {plotting.save_png(packing_figure(result), plot)}", file=sys.stderr)
    return 0
