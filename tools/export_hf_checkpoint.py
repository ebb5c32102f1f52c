"""Export a checkpoint of this package to a Hugging Face directory transformers and vLLM load.

The checkpoint may have been saved under any TP/PP/EP layout: each process loads its slice as
tensor parallel 1 (Megatron reshards on load) and writes its own shard files, so no process ever
holds the whole model; run it under torchrun over pipeline x expert CPU ranks for big models.

  python tools/export_hf_checkpoint.py --load runs/dpo/ckpt --output hf-out --hf-config hf-src
  torchrun --nproc-per-node 16 tools/export_hf_checkpoint.py --load runs/dpo/ckpt \\
      --output hf-out --hf-config hf-src --pipeline 2 --first-stage-layers 30 --expert 8

The output holds ``model-XXXXX-of-YYYYY.safetensors`` shards with ``model.safetensors.index.json``,
``config.json`` (``--hf-config``'s, with the exported dtype and class; else generated, with the
special token ids of the tokenizer the checkpoint's training data was made with, from the
checkpoint's model for the first architecture that expresses it exactly, or ``--model-type``),
``generation_config.json`` and the tokenizer files (``--tokenizer``, else ``--hf-config``'s).
Source tensors the checkpoint does not hold (A.X K1's multi-token-prediction layer) are carried
over from ``--hf-config`` unless ``--drop-mtp``. A reward model (objective ``rm``) exports as
``<Arch>ForSequenceClassification`` (``num_labels: 1``, ``score.weight``, ``pad_token_id``).
The directory is written beside the output as ``<output>.partial`` and renamed into place.

A LoRA checkpoint (``model.lora`` set) exports with its adapters folded into the weights; with
``--peft-adapter DIR`` instead of ``--output`` only its adapters are written, as a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``, see ``megatron_prefpack.models.hf.peft``)
that ``peft.PeftModel.from_pretrained`` loads onto the HF base model (``--hf-config``, whose path
becomes ``base_model_name_or_path``); a reward model's adapter also carries its head (load it onto
``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=<not EOS>)``).

Bad input stops every rank with exit status 2 and ``export_hf_checkpoint: <file>: reason``: an
unreadable or unverifiable checkpoint, a model that differs from ``--hf-config`` (the fields are
listed), an architecture that cannot express the model, a non-empty output without
``--overwrite``, a reward model without a usable pad token, ``--peft-adapter`` for a checkpoint without LoRA
adapters or with adapters PEFT cannot load onto that architecture.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from megatron_prefpack.models.config import ModelConfig
    from megatron_prefpack.models.hf import Architecture

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
GENERATION_CONFIG = "generation_config.json"


class ExportError(ValueError):
    """Bad input; the message starts with the file at fault."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--load", type=Path, required=True, help="checkpoint or save dir (latest)")
    parser.add_argument("--output", type=Path, default=None, help="the Hugging Face directory to write")
    parser.add_argument(
        "--peft-adapter", type=Path, default=None, help="write only the LoRA adapters, as PEFT, here"
    )
    parser.add_argument("--hf-config", type=Path, default=None, help="the source HF directory")
    parser.add_argument("--tokenizer", type=Path, default=None, help="directory of tokenizer files")
    parser.add_argument("--model-type", default=None, help="HF model_type when no --hf-config")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    parser.add_argument("--drop-mtp", action="store_true", help="do not carry over MTP layers")
    parser.add_argument("--pad-token-id", type=int, default=None, help="reward models: the pad token")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard file")
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline stages the work is split over")
    parser.add_argument("--first-stage-layers", type=int, default=None, help="uneven first pipeline stage")
    parser.add_argument("--last-stage-layers", type=int, default=None, help="uneven last pipeline stage")
    parser.add_argument("--expert", type=int, default=1, help="expert-parallel ranks the experts split over")
    args = parser.parse_args(argv)
    if (args.output is None) == (args.peft_adapter is None):
        parser.error("give one of --output (the model) or --peft-adapter (a LoRA checkpoint's adapters)")
    args.output = args.output or args.peft_adapter
    return args


@dataclasses.dataclass
class Plan:
    """What every rank needs to know, decided before any process group exists."""

    arch: Architecture
    cfg: ModelConfig
    reward: bool
    hf_config: dict[str, Any]


def _checkpoint_model(load: Path) -> tuple[ModelConfig, bool, dict[str, int]]:
    """The model of checkpoint ``load``, whether it is a reward model, and the special token ids
    of the tokenizer its training data was made with (``bos/eos/pad_token_id``; empty when that
    ``dataset.json`` is no longer readable, or the checkpoint was converted, not trained)."""
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import ConfigError, config_from_yaml, model_config

    try:
        state = checkpoint.read_state(load)
        source = f"{checkpoint.resolve(load) / checkpoint.META}: config_yaml"
        train_cfg = config_from_yaml(state.config_yaml, source)
        cfg = model_config(train_cfg)
    except (checkpoint.CheckpointError, ConfigError) as err:
        raise ExportError(str(err)) from err
    token_ids = _training_token_ids(Path(train_cfg.data.path)) if train_cfg.data.path else {}
    return cfg, state.objective == "rm", token_ids


def _training_token_ids(data: Path) -> dict[str, int]:
    """``bos/eos/pad_token_id`` of the dataset's tokenizer (``dataset.json``), for a generated
    config.json: a model trained here uses that tokenizer's ids, not the architecture's defaults."""
    from megatron_prefpack.data.group_dataset import DatasetError
    from megatron_prefpack.data.json_files import read_json_object

    try:
        tokenizer = read_json_object(data / "dataset.json", DatasetError).get("tokenizer", {})
    except DatasetError:
        return {}
    ids = {f"{name}_token_id": tokenizer.get(f"{name}_id") for name in ("bos", "eos", "pad")}
    return {key: value for key, value in ids.items() if isinstance(value, int)}


def _source_config(args: argparse.Namespace, cfg: ModelConfig) -> tuple[Architecture, dict[str, Any]]:
    """``--hf-config``'s config.json, refused when it describes another model."""
    from megatron_prefpack.models.hf import (
        ConversionError,
        architecture,
        differing_fields,
        model_config_from_hf,
        read_hf_config,
    )

    path = args.hf_config / "config.json"
    try:
        hf = read_hf_config(args.hf_config)
        arch = architecture(hf)
        differing = differing_fields(cfg, model_config_from_hf(hf))
    except ConversionError as err:
        raise ExportError(str(err) if str(err).startswith(str(path)) else f"{path}: {err}") from err
    if differing:
        raise ExportError(
            f"{path}: describes another model than {args.load} (checkpoint != config.json): {'; '.join(differing)}"
        )
    return arch, dict(hf)


def _generated_config(args: argparse.Namespace, cfg: ModelConfig) -> tuple[Architecture, dict[str, Any]]:
    """config.json for the first architecture (or ``--model-type``'s) that expresses ``cfg``."""
    from megatron_prefpack.models.hf import ARCHITECTURES, ConversionError, generated_hf_config

    types = [args.model_type] if args.model_type else list(ARCHITECTURES)
    reasons = []
    for model_type in types:
        if model_type not in ARCHITECTURES:
            raise ExportError(f"--model-type {model_type}: not one of {sorted(ARCHITECTURES)}")
        try:
            return ARCHITECTURES[model_type], generated_hf_config(ARCHITECTURES[model_type], cfg)
        except ConversionError as err:
            reasons.append(f"{model_type}: {err}")
    raise ExportError(
        f"{args.load}: no Hugging Face architecture expresses this model ({'; '.join(reasons)})"
    )


def _final_config(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """config.json as written: the exported dtype and class, reward-model fields, no FP8 scheme."""
    hf = dict(plan.hf_config)
    hf.pop("quantization_config", None)
    hf.pop("torch_dtype", None)
    hf["dtype"] = args.dtype
    kind = "ForSequenceClassification" if plan.reward else "ForCausalLM"
    hf["architectures"] = [plan.arch.class_prefix + kind]
    if plan.reward:
        hf["num_labels"] = 1
        hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        hf["pad_token_id"] = _reward_pad_token(args, hf)
    return hf


def _reward_pad_token(args: argparse.Namespace, hf: dict[str, Any]) -> int:
    """transformers reads a sequence's reward at its last token that is not ``pad_token_id``;
    here rewards are read at the response's last token (its EOS), so pad must not be EOS."""
    pad = args.pad_token_id if args.pad_token_id is not None else hf.get("pad_token_id")
    where = (
        "--pad-token-id" if args.pad_token_id is not None else f"{args.hf_config or args.load}: pad_token_id"
    )
    if pad is None:
        raise ExportError(
            f"{args.hf_config or args.load}: a reward model needs a pad_token_id (transformers reads the "
            "reward at the last non-pad token); give --pad-token-id"
        )
    eos = hf.get("eos_token_id")
    if pad == eos or (isinstance(eos, list) and pad in eos):
        raise ExportError(
            f"{where}: {pad} is the EOS token, so transformers would read rewards before a response's "
            "final EOS; give another --pad-token-id"
        )
    return pad


def plan_export(args: argparse.Namespace) -> Plan:
    """Check every input before any work; raises :class:`ExportError`."""
    cfg, reward, token_ids = _checkpoint_model(args.load)
    if args.peft_adapter is not None and cfg.lora is None:
        raise ExportError(
            f"{args.load}: not a LoRA checkpoint (its model.lora is not set), so there are no adapters for "
            "--peft-adapter; export the model with --output"
        )
    base = dataclasses.replace(cfg, lora=None)  # the HF model the adapters fold into
    if args.hf_config:
        arch, hf = _source_config(args, base)
    else:
        arch, hf = _generated_config(args, base)
        if token_ids:  # no BOS unless the training data's tokenizer adds one
            hf = {**hf, "bos_token_id": None, **token_ids}
    plan = Plan(arch, cfg, reward, hf)
    if args.peft_adapter is None:  # an adapter has no config.json: its loader picks the pad token
        _final_config(args, plan)  # the reward fields' checks
    taken = args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir()))
    if taken and not args.overwrite:
        raise ExportError(f"{args.output}: exists and is not empty (give --overwrite to replace it)")
    if args.tokenizer is not None and not any((args.tokenizer / f).is_file() for f in TOKENIZER_FILES):
        raise ExportError(f"{args.tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return plan


def _build_chunk(args: argparse.Namespace, plan: Plan) -> torch.nn.Module:
    """This rank's model chunk (with the reward head of a reward model); a split Megatron
    refuses raises ``ConversionError`` naming the flags."""
    from megatron_prefpack.models.hf import build_slice

    model = build_slice(
        plan.cfg,
        pipeline=args.pipeline,
        expert=args.expert,
        first_stage_layers=args.first_stage_layers,
        last_stage_layers=args.last_stage_layers,
    )
    if plan.reward:
        from megatron_prefpack.losses.reward import attach_reward_head

        attach_reward_head(model)
    return model


def _partial(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _write_model_shards(args: argparse.Namespace, plan: Plan, model: torch.nn.Module, directory: Path):
    """This rank's share of the model's HF tensors into its own shard files."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_prefpack.models.config import torch_dtype
    from megatron_prefpack.models.hf import hf_tensors
    from megatron_prefpack.models.hf.safetensors_io import ShardWriter

    writer = ShardWriter(directory, f"rank{dist.get_rank():05d}", int(args.max_shard_gb * 2**30))
    dtype = torch_dtype(args.dtype)
    tensors = hf_tensors(
        model,
        plan.arch,
        plan.cfg,
        reward=plan.reward,
        replicated=parallel_state.get_data_parallel_rank() == 0,
        experts=parallel_state.get_expert_data_parallel_rank() == 0,
    )
    for name, tensor in tensors:
        writer.add(name, tensor.to(dtype))
    return writer


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _carried_names(args: argparse.Namespace, plan: Plan, source: Any, exported: set[str]) -> list[str]:
    """Source tensors the export does not produce: not trained here, carried over as they are
    (dequantized, cast). FP8 scales and fused experts of exported layers are the exported
    tensors' own; ``--drop-mtp`` drops layers ``num_hidden_layers..``."""
    from megatron_prefpack.models.hf.safetensors_io import fused_expert_tensor

    def kept(name: str) -> bool:
        if name in exported or name.endswith("_scale_inv"):
            return False
        if fused_expert_tensor(name) and f"{name.rsplit('.', 1)[0]}.0.down_proj.weight" in exported:
            return False
        layer = _LAYER.match(name)
        return not (args.drop_mtp and layer is not None and int(layer[1]) >= plan.cfg.num_layers)

    return sorted(n for n in source.files if kept(n))


def _publish(
    args: argparse.Namespace, plan: Plan, partial: Path, shards: list[dict[str, list[str]]], size: int
):
    """Rank 0: shard files renamed to ``model-i-of-n``, the index, config and side files, then the
    directory moved into place (an existing output is replaced only after that)."""
    from megatron_prefpack.models.hf.safetensors_io import INDEX_FILE

    files = [(file, names) for rank_files in shards for file, names in rank_files.items()]
    weight_map = {}
    for i, (file, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (partial / file).rename(partial / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (partial / "config.json").write_text(json.dumps(_final_config(args, plan), indent=2) + "\n")
    for directory, names in (
        (args.hf_config, (GENERATION_CONFIG,)),
        (args.tokenizer or args.hf_config, TOKENIZER_FILES),
    ):
        for name in names if directory is not None else ():
            if (directory / name).is_file():
                shutil.copyfile(directory / name, partial / name)
    _move_into_place(args.output, partial)
    return len(files)


def _move_into_place(output: Path, partial: Path) -> None:
    """``partial`` renamed to ``output``; an existing ``output`` is removed only after that."""
    replaced = output.with_name(output.name + ".replaced")
    if output.exists():
        output.rename(replaced)
    partial.rename(output)
    if replaced.exists():
        shutil.rmtree(replaced) if replaced.is_dir() else replaced.unlink()


def _write_peft_adapter(args: argparse.Namespace, plan: Plan, model: torch.nn.Module) -> int:
    """Every rank's adapters gathered on rank 0, written there as a PEFT adapter directory."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    from megatron_prefpack.models.config import torch_dtype
    from megatron_prefpack.models.hf import ConversionError
    from megatron_prefpack.models.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_pieces, peft_adapter

    error, pieces = None, ([], {})
    try:
        pieces = adapter_pieces(
            model,
            plan.arch,
            plan.cfg,
            reward=plan.reward,
            replicated=parallel_state.get_data_parallel_rank() == 0,
            experts=parallel_state.get_expert_data_parallel_rank() == 0,
        )
    except ConversionError as err:
        error = str(err)
    if _agree_on_failure(error):
        return 2
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    error = None
    if dist.get_rank() == 0:
        try:
            tensors, config = peft_adapter(
                [p for rank_pieces, _ in gathered for p in rank_pieces],
                {name: t for _, full in gathered for name, t in full.items()},
                plan.arch,
                plan.cfg,
                reward=plan.reward,
                base_model=str(args.hf_config) if args.hf_config else None,
            )
        except ConversionError as err:
            error = f"{args.load}: {err}"
    if _agree_on_failure(error):
        return 2
    if dist.get_rank() == 0:
        partial = _partial(args.output)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        dtype = torch_dtype(args.dtype)
        save_file({k: t.to(dtype).contiguous() for k, t in tensors.items()}, partial / ADAPTER_WEIGHTS)
        (partial / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        _move_into_place(args.output, partial)
        print(
            f"[export] wrote {args.output}: PEFT LoRA adapter for {plan.arch.class_prefix} "
            f"(r={config['r']}, {len(tensors)} tensors, {args.dtype})"
        )
    dist.barrier()
    return 0


def _export(args: argparse.Namespace, plan: Plan) -> int:
    import torch.distributed as dist

    from megatron_prefpack.models.config import torch_dtype
    from megatron_prefpack.models.hf import ConversionError, SafetensorsCheckpoint
    from megatron_prefpack.training import checkpoint

    rank, start = dist.get_rank(), time.monotonic()
    partial = _partial(args.output)
    error = None
    try:
        model = _build_chunk(args, plan)
        checkpoint.load(args.load, [model], restore_rng=False)
    except (ConversionError, checkpoint.CheckpointError) as err:
        error = str(err)
    if _agree_on_failure(error):
        return 2
    if args.peft_adapter is not None:
        return _write_peft_adapter(args, plan, model)
    if plan.cfg.lora is not None:
        from megatron_prefpack.models.lora import merge_adapters

        merge_adapters([model])
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    writer = _write_model_shards(args, plan, model, partial)
    exported: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(exported, writer.names)
    error = None
    if rank == 0 and args.hf_config is not None:
        try:
            source = SafetensorsCheckpoint(args.hf_config)
            carried = _carried_names(args, plan, source, {n for ns in exported for n in ns})
            for name in carried:
                writer.add(name, source.read(name).to(torch_dtype(args.dtype)))
            if carried:
                print(
                    f"[export] carried over from {args.hf_config}: {len(carried)} tensors, e.g. {carried[:3]}"
                )
        except ConversionError as err:
            error = str(err)
    files = writer.close()
    if _agree_on_failure(error):
        return 2
    shards: list[dict[str, list[str]] | None] = [None] * dist.get_world_size()
    sizes: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, files)
    dist.all_gather_object(sizes, writer.total_bytes)
    print(
        f"[export] rank {rank}: {sum(len(n) for n in files.values())} tensors in {time.monotonic() - start:.1f} s"
    )
    if rank == 0:
        count = _publish(args, plan, partial, shards, sum(sizes))
        kind = "reward model" if plan.reward else "causal LM"
        print(f"[export] wrote {args.output}: {plan.arch.class_prefix} {kind}, {count} shards, {args.dtype}")
    dist.barrier()
    return 0


def _fail(message: str) -> int:
    print(f"export_hf_checkpoint: {message}", file=sys.stderr)
    return 2


def _agree_on_failure(error: str | None) -> bool:
    """Whether any rank failed (collective); rank 0 reports each distinct failure once."""
    from megatron_prefpack.platform.distributed import any_rank_failed

    return any_rank_failed(error, "export_hf_checkpoint")


def main(argv: list[str] | None = None) -> int:
    """Export; bad input prints ``export_hf_checkpoint: <file>: reason`` and returns 2 on every rank."""
    args = parse_args(argv)
    from megatron_prefpack.platform import distributed as platform

    try:
        plan = plan_export(args)
    except ExportError as err:
        return _fail(str(err))
    try:
        platform.initialize(pipeline_parallel=args.pipeline, expert_parallel=args.expert)
    except ValueError as err:
        return _fail(str(err))
    try:
        return _export(args, plan)
    finally:
        platform.destroy()


if __name__ == "__main__":
    sys.exit(main())
