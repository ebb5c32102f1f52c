"""Convert a Hugging Face DeepSeek-V3-architecture checkpoint to a Megatron distributed checkpoint.

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
(e.g. DeepSeek-V3's multi-token-prediction layer) are counted and listed, not converted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


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
    parser.add_argument(
        "--post-moe-norm-key",
        default=None,
        help="checkpoint key of a post-MoE norm, with {layer} (A.X K1); absent in DeepSeek-V3",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import dataclasses

    import torch.distributed as dist
    import yaml

    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.models.config import to_transformer_config
    from megatron_prefpack.models.hf_deepseek import (
        ConversionError,
        SafetensorsCheckpoint,
        fill_model,
        model_config_from_hf,
    )
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint

    config_file = args.hf_dir / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
        cfg = model_config_from_hf(
            hf_config, post_moe_norm=args.post_moe_norm_key is not None, name=args.hf_dir.name
        )
        cfg = dataclasses.replace(cfg, params_dtype=args.dtype)
        source = SafetensorsCheckpoint(args.hf_dir)
    except (OSError, ValueError) as err:
        print(f"convert_hf_checkpoint: {config_file}: {err}", file=sys.stderr)
        return 2

    try:
        platform.initialize(pipeline_parallel=args.pipeline, expert_parallel=args.expert)
    except ValueError as err:
        print(f"convert_hf_checkpoint: {err}", file=sys.stderr)
        return 2
    rank = dist.get_rank()
    try:
        start = time.monotonic()
        tcfg = to_transformer_config(
            cfg,
            pipeline_parallel=args.pipeline,
            expert_parallel=args.expert,
            num_layers_in_first_pipeline_stage=args.first_stage_layers,
            num_layers_in_last_pipeline_stage=args.last_stage_layers,
        )
        model = build_model(cfg, tcfg)
        try:
            filled = fill_model(
                model, source, post_moe_norm_key=args.post_moe_norm_key, progress=_progress(rank, start)
            )
        except ConversionError as err:
            print(f"convert_hf_checkpoint: rank {rank}: {err}", file=sys.stderr)
            return 2
        print(f"[convert] rank {rank}: {filled} tensors in {time.monotonic() - start:.1f} s", flush=True)
        used: list[set[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(used, source.used)
        model_yaml = yaml.safe_dump({"model": dataclasses.asdict(cfg)}, sort_keys=False)
        state = checkpoint.CheckpointState(0, 0, None, "lm", model_yaml, dist.get_world_size())
        path = checkpoint.save(args.output, state, [model], None, keep=0)
        if rank == 0:
            ignored = sorted(set(source.files) - set().union(*used))
            (args.output / "model.yaml").write_text(model_yaml)
            print(f"[convert] wrote {path} and {args.output / 'model.yaml'}")
            print(
                f"[convert] {len(ignored)} checkpoint tensors not used"
                + (f", e.g. {ignored[:3]}" if ignored else "")
            )
    finally:
        platform.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
