"""Convert a Hugging Face checkpoint to a Megatron distributed checkpoint.

Architectures (``config.json`` ``model_type``): see ``megatron_prefpack.models.hf.ARCHITECTURES``.

The output loads with ``checkpoint.load`` in ``prefpack train`` / ``prefpack ref-logprobs`` under
any TP/PP/EP layout (Megatron reshards on load); ``model.yaml`` beside it is the ``model:``
section of the training config that matches it.

  # small models: one process
  python tools/convert_hf_checkpoint.py --hf-dir ckpts/hf --output ckpts/mcore --dtype float32

  # DeepSeek-V3 / A.X K1 size: CPU processes that each hold a slice (expert x pipeline ranks);
  # each rank reads only its layers and experts from the safetensors shards
  torchrun --nproc-per-node 16 tools/convert_hf_checkpoint.py --hf-dir ckpts/dsv3 \\
      --output ckpts/dsv3-mcore --pipeline 2 --first-stage-layers 30 --expert 8

FP8 weights (block-scaled, ``weight_scale_inv``) are dequantized. Tensors the model does not use
are counted and listed, not converted: multi-token-prediction layers (``num_nextn_predict_layers``,
layers ``num_hidden_layers..``) are reported as kept aside (``tools/export_hf_checkpoint.py
--hf-config`` carries them over from this directory). A routing correction bias the checkpoint
lacks is filled with zeros only where transformers does the same (A.X K1), and said.

Bad input stops every rank with exit status 2 and ``convert_hf_checkpoint: <file>: reason``, never
a traceback: a missing or invalid ``config.json`` or ``model.safetensors.index.json``, a missing,
truncated or corrupt shard (all shard headers are checked before any model is built), a tensor
the model needs that the checkpoint lacks or has in another shape (named with the rank), or a
pipeline/expert split the model does not allow.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from megatron_prefpack.models.config import ModelConfig
    from megatron_prefpack.models.hf import Architecture, SafetensorsCheckpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hf-dir", type=Path, required=True, help="config.json + *.safetensors")
    parser.add_argument("--output", type=Path, required=True, help="save dir of the Megatron checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline stages the work is split over")
    parser.add_argument("--first-stage-layers", type=int, default=None, help="uneven first pipeline stage")
    parser.add_argument("--last-stage-layers", type=int, default=None, help="uneven last pipeline stage")
    parser.add_argument(
        "--expert", type=int, default=1, help="expert-parallel ranks the experts are split over"
    )
    return parser.parse_args(argv)


def _progress(rank: int, start: float):
    """Rank 0 reports every tenth of its tensors (a large slice takes minutes)."""
    reported = [0]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // total
        if rank == 0 and tenth > reported[0]:
            reported[0] = tenth
            print(f"[convert] rank 0: {done}/{total} tensors, {time.monotonic() - start:.0f} s", flush=True)

    return report


def _fail(message: str) -> int:
    print(f"convert_hf_checkpoint: {message}", file=sys.stderr)
    return 2


def _agree_on_failure(error: str | None) -> bool:
    """Whether any rank failed (collective); rank 0 reports each distinct failure once."""
    from megatron_prefpack.platform.distributed import any_rank_failed

    return any_rank_failed(error, "convert_hf_checkpoint")


def _build_chunk(args: argparse.Namespace, cfg: ModelConfig) -> torch.nn.Module:
    """This rank's model chunk; a split Megatron refuses raises ``ConversionError``."""
    from megatron_prefpack.models.hf import build_slice

    return build_slice(
        cfg,
        pipeline=args.pipeline,
        expert=args.expert,
        first_stage_layers=args.first_stage_layers,
        last_stage_layers=args.last_stage_layers,
    )


def _report_unused(source: SafetensorsCheckpoint, used: set[str], cfg: ModelConfig) -> None:
    """Rank 0: the checkpoint tensors no rank read, MTP layers (kept aside for export) apart."""
    import re

    unused = sorted(set(source.files) - used)
    layer = re.compile(r"model\.layers\.(\d+)\.")
    mtp = [n for n in unused if (m := layer.match(n)) and int(m[1]) >= cfg.num_layers]
    other = [n for n in unused if n not in set(mtp)]
    if mtp:
        layers = sorted({int(layer.match(n)[1]) for n in mtp})
        print(
            f"[convert] kept aside for export: {len(mtp)} tensors of multi-token-prediction layer(s) "
            f"{layers} (not trained here; tools/export_hf_checkpoint.py --hf-config "
            f"{source.directory} carries them over)"
        )
    print(f"[convert] {len(other)} checkpoint tensors not used" + (f", e.g. {other[:3]}" if other else ""))


def _convert(
    args: argparse.Namespace, arch: Architecture, cfg: ModelConfig, source: SafetensorsCheckpoint
) -> int:
    """Build this rank's model chunk, fill it from ``source`` and save; 2 if any rank failed."""
    import dataclasses

    import torch.distributed as dist
    import yaml

    from megatron_prefpack.models.hf import ConversionError, fill_model
    from megatron_prefpack.training import checkpoint

    rank = dist.get_rank()
    start = time.monotonic()
    error = None
    try:
        model = _build_chunk(args, cfg)
        report = fill_model(model, arch, cfg, source, progress=_progress(rank, start))
    except ConversionError as err:
        error = str(err)
    if _agree_on_failure(error):
        return 2
    print(f"[convert] rank {rank}: {report.filled} tensors in {time.monotonic() - start:.1f} s", flush=True)
    if report.zero_filled:
        print(
            f"[convert] rank {rank}: {len(report.zero_filled)} tensors absent from the checkpoint, filled "
            f"with zeros as transformers does for {arch.model_type}, e.g. {report.zero_filled[0]!r}",
            flush=True,
        )
    used: list[set[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(used, source.used)
    model_yaml = yaml.safe_dump({"model": dataclasses.asdict(cfg)}, sort_keys=False)
    state = checkpoint.CheckpointState(0, 0, None, "lm", model_yaml, dist.get_world_size())
    path = checkpoint.save(args.output, state, [model], None, keep=0)
    if rank == 0:
        (args.output / "model.yaml").write_text(model_yaml)
        print(f"[convert] wrote {path} and {args.output / 'model.yaml'}")
        _report_unused(source, set().union(*used), cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Convert; bad input (files, config, arguments) prints ``convert_hf_checkpoint: <file>: reason``
    and returns 2 on every rank."""
    args = parse_args(argv)
    import dataclasses

    from megatron_prefpack.models.hf import ConversionError, SafetensorsCheckpoint, read_model_config
    from megatron_prefpack.platform import distributed as platform

    try:
        arch, cfg = read_model_config(args.hf_dir)
        source = SafetensorsCheckpoint(args.hf_dir)
        args.output.mkdir(parents=True, exist_ok=True)
    except ConversionError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"{args.output}: {err.strerror or err}")
    try:
        platform.initialize(pipeline_parallel=args.pipeline, expert_parallel=args.expert)
    except ValueError as err:
        return _fail(str(err))
    try:
        return _convert(args, arch, dataclasses.replace(cfg, params_dtype=args.dtype), source)
    finally:
        platform.destroy()


if __name__ == "__main__":
    sys.exit(main())
