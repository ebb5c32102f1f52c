"""The ``prefpack`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; a :class:`CommandGroup` (``bench``) gathers subcommands from modules of
different layers under one name, so no lower layer has to import a higher one to offer them.
Modules are imported only when their subcommand runs, so ``prefpack --help`` stays fast;
``prefpack CMD [SUB] --help`` imports just that module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module`` defines ``add_arguments(parser)`` and ``run(args) -> int``."""

    module: str
    help: str


@dataclass(frozen=True)
class CommandGroup:
    """A subcommand whose own subcommands are ``commands`` (``prefpack bench packing``)."""

    help: str
    commands: dict[str, Command]


SUBCOMMANDS: dict[str, Command | CommandGroup] = {
    "train-tokenizer": Command(
        "megatron_prefpack.data.tokenizer_training",
        "train a small SentencePiece tokenizer from a JSONL file of preference records",
    ),
    "preprocess": Command(
        "megatron_prefpack.data.preprocess",
        "JSONL preference records -> tokenized, memory-mapped, indexed group dataset",
    ),
    "mode-overlap": Command(
        "megatron_prefpack.data.mode_overlap",
        "Think-Fusion: join a thinking and a plain SFT set by prompt into [/think, /no_think] response groups",
    ),
    "bench": CommandGroup(
        "benchmarks: preference packing against the two baselines",
        {
            "packing": Command(
                "megatron_prefpack.data.bench",
                "rows, padding, tokens and attention pairs per group: prefpack vs duplicated vs unpacked",
            ),
            "step": Command(
                "megatron_prefpack.training.bench_step",
                "measured forward+backward time of a model: prefpack vs duplicated vs unpacked rows",
            ),
        },
    ),
    "ref-logprobs": Command(
        "megatron_prefpack.training.ref_logprobs",
        "forward-only pass of a reference model; stores per-response log-prob sums",
    ),
    "plan": Command(
        "megatron_prefpack.training.plan",
        "memory per rank (exact weights, grads, optimizer; estimated activations) and step time on a GPU cluster",
    ),
    "train": Command(
        "megatron_prefpack.training.train",
        "train with DPO, reward-model or multi-response SFT losses (torchrun / srun)",
    ),
    "merge-lora": Command(
        "megatron_prefpack.training.merge_lora",
        "fold a LoRA run's adapters into its base model: a full checkpoint (torchrun for large models)",
    ),
    "merge": Command(
        "megatron_prefpack.training.merge_checkpoints",
        "weighted linear merge of full checkpoints saved under any layouts (e.g. 0.8 A + 0.2 B)",
    ),
    "report": Command(
        "megatron_prefpack.training.report",
        "charts of a training run from its metrics.jsonl: loss, rewards, learning rate, throughput, grad norm",
    ),
}


def _add_commands(
    sub: argparse._SubParsersAction,
    commands: dict[str, Command | CommandGroup],
    selected: list[str],
) -> None:
    """Add ``commands`` to ``sub``; only the command named by ``selected[0]`` (and, in a group,
    by the names after it) imports its module and gets its arguments."""
    for name, command in commands.items():
        parser = sub.add_parser(name, help=command.help, description=command.help)
        if not selected or name != selected[0]:
            continue
        if isinstance(command, CommandGroup):
            inner = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
            _add_commands(inner, command.commands, selected[1:])
        else:
            module = importlib.import_module(command.module)
            module.add_arguments(parser)
            parser.set_defaults(_run=module.run)


def _build_parser(selected: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefpack",
        description="Preference packing for Megatron-Core: a prompt is computed once and shared by "
        "all of its responses, and many such groups fill one fixed-length row.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_commands(sub, SUBCOMMANDS, selected)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _build_parser([a for a in argv if not a.startswith("-")]).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
