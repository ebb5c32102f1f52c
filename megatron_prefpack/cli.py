"""The ``prefpack`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so
``prefpack --help`` stays fast; ``prefpack CMD --help`` imports just that module.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train-tokenizer": (
        "megatron_prefpack.data.tokenizer_training",
        "train a small SentencePiece tokenizer from a JSONL file of preference records",
    ),
    "preprocess": (
        "megatron_prefpack.data.preprocess",
        "JSONL preference records -> tokenized, memory-mapped, indexed group dataset",
    ),
    "bench": (
        "megatron_prefpack.data.bench",
        "benchmarks: `bench packing` compares preference packing with the two baselines",
    ),
    "ref-logprobs": (
        "megatron_prefpack.training.ref_logprobs",
        "forward-only pass of a reference model; stores per-response log-prob sums",
    ),
    "train": (
        "megatron_prefpack.training.train",
        "train with DPO, reward-model or multi-response SFT losses (torchrun / srun)",
    ),
}


def _build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefpack",
        description="Preference packing for Megatron-Core: a prompt is computed once and shared by "
        "all of its responses, and many such groups fill one fixed-length row.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = _build_parser(selected if selected in SUBCOMMANDS else None).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
