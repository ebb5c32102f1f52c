"""``prefpack merge-lora --config CFG --load LORA_CKPT --output OUT``: fold a LoRA run's adapters
into its base model and write a full checkpoint.

The model is built with the config's parallel layout (one process, or ``torchrun`` for a model
that needs sharding), loaded as base + adapters (``checkpoint.load`` reads the base checkpoint
the LoRA checkpoint names, checking it is unchanged), merged in place
(``models.lora.merge_adapters``: ``W += (alpha / rank) B A`` per shard, then the wrappers are
removed) and saved as a weights-only checkpoint in ``OUT`` (a save dir with a ``latest``
pointer). That checkpoint is a plain model's: ``checkpoint.load`` and
``tools/export_hf_checkpoint.py`` read it like any other, and its stored config has no
``model.lora`` (and no ``reference.mode: base``, which only a LoRA model has). The step,
objective (a reward model keeps its head) and the rest of the config are the LoRA run's.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="the LoRA run's config (model with model.lora, layout)"
    )
    parser.add_argument("--load", required=True, help="the LoRA checkpoint (or its save dir)")
    parser.add_argument("--output", required=True, help="save dir for the merged full checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from megatron_prefpack.training.checkpoint import CheckpointError
    from megatron_prefpack.training.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, [*args.set, *args.overrides], check_reference=False)
        merge_lora(cfg, args.load, Path(args.output))
    except (ConfigError, CheckpointError) as err:
        print(f"prefpack merge-lora: {err}", file=sys.stderr)
        return 2
    return 0


def merged_config(cfg: Any) -> Any:
    """``cfg`` as the merged model's config: ``model.lora`` removed, and a ``base`` reference
    (the LoRA model's own base weights) turned into ``none``."""
    from megatron_prefpack.training.config import ReferenceConfig

    plain = copy.deepcopy(cfg)
    plain.model = {k: v for k, v in plain.model.items() if k != "lora"}
    if plain.reference.mode == "base":
        plain.reference = ReferenceConfig()
    return plain


def merge_lora(cfg: Any, load: str | Path, output: Path) -> Path:
    """Load the LoRA checkpoint ``load`` into ``cfg``'s model, merge, save in ``output``.

    Collective (every rank of the layout calls it). Returns the written checkpoint directory.
    Raises ``ConfigError`` when ``cfg`` has no ``model.lora`` and ``CheckpointError`` when
    ``load`` is not a LoRA checkpoint, or its base checkpoint is gone or changed."""
    import torch.distributed as dist

    from megatron_prefpack.models.lora import merge_adapters
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import check_parallel_layout, config_error, model_config, to_yaml
    from megatron_prefpack.training.model_setup import (
        build_chunks,
        init_distributed,
        transformer_config,
    )

    start = time.perf_counter()
    model_cfg = model_config(cfg)
    if model_cfg.lora is None:
        raise config_error(cfg, "model.lora", "merge-lora needs the LoRA run's config (it has no model.lora)")
    init_distributed(cfg)
    try:
        check_parallel_layout(cfg, dist.get_world_size(), model_cfg)
        state = checkpoint.read_state(load)  # rank 0 re-reads it collectively in load()
        if state.base is None:
            raise checkpoint.CheckpointError(f"{load}: a full checkpoint, not a LoRA run's: nothing to merge")
        chunks = build_chunks(
            model_cfg, transformer_config(cfg, model_cfg), reward_head=state.objective == "rm"
        )
        platform.progress(
            "merge-lora",
            f"loading base {state.base['path']} (step {state.base['step']}) and the adapters of {load}",
        )
        state = checkpoint.load(load, chunks, restore_rng=False)
        merge_adapters(chunks)
        if checkpoint.has_adapters(chunks):
            raise RuntimeError("merge_adapters left adapter parameters in the model")
        platform.progress(
            "merge-lora", f"adapters merged into the base weights ({time.perf_counter() - start:.1f} s)"
        )
        merged = checkpoint.CheckpointState(
            step=state.step,
            consumed_rows=state.consumed_rows,
            scheduler=None,
            objective=state.objective,
            config_yaml=to_yaml(merged_config(cfg)),
            world_size=dist.get_world_size(),
        )
        path = checkpoint.save(output, merged, chunks, None, keep=0)
        platform.progress(
            "merge-lora", f"wrote the full checkpoint {path} in {time.perf_counter() - start:.1f} s"
        )
    finally:
        platform.destroy()
    return path


def main() -> int:
    parser = argparse.ArgumentParser(prog="prefpack merge-lora")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
