"""``prefpack merge --input A --input B --weights 0.8 0.2 --output OUT``: a weighted linear
merge of full checkpoints, ``theta = sum_i w_i * theta_i`` (e.g. Think-Fusion: 0.8 x a thinking
SFT model + 0.2 x a non-thinking one).

Inputs. Two or more full checkpoints of this package (a ``prefpack train`` save dir, whose
``latest`` is taken, or an iteration directory), each saved under any TP/PP/EP layout. Their
models must be the same architecture: the resolved ``ModelConfig`` of every input's stored config
is compared with input A's, and a difference is refused naming the key, except settings that
do not change what the weights mean (:data:`NOT_ARCHITECTURE`: attention backend, init std, MoE
aux-loss coefficient and expert-bias update rate). Reward models merge (their head is one more
weight) only with reward models. LoRA checkpoints (adapters only) are refused: a merge of
adapters is not the merge of the models; ``prefpack merge-lora`` folds each into a full
checkpoint first.

Weights. Any finite reals, one per input. They must sum to 1 (within 1e-6): every affine
combination does (interpolation ``0.8/0.2``, extrapolation ``1.5/-0.5``, task arithmetic
``A + l*(B - C)`` = ``1, l, -l``), and a sum other than 1 scales every weight of the model,
norms included, which is nearly always a typo; ``--allow-any-sum`` merges anyway.

Layout. The merge runs under its own layout: the launcher's world size (one process, or
``torchrun``/``srun`` for a model too large for one) and ``parallel.*`` overrides (``--set
parallel.tensor=2``), every other parallel and performance setting at its default; nothing else
may be overridden (the model is the inputs'). The output is written in that layout, as any
checkpoint of this package, and ``checkpoint.load`` reads it under any other.

Streaming. One model is built, under the merge's layout (input A's config; a reward head for
reward models). Each input in turn is loaded into it (``checkpoint.load``: verified against its
manifest, resharded by Megatron's dist_checkpointing from the layout it was saved in) and
``w_i * tensor`` is added, tensor by tensor, into an fp32 accumulator of this rank's shard; the
accumulator is copied into the model after the last input and saved. Every floating-point
entry of the state dict is merged (parameters and buffers such as the router's expert bias);
other entries (Transformer Engine's extra state) are input A's. Peak memory per rank: its model
shard (parameter dtype) + the fp32 accumulator of that shard (4 bytes per parameter) + two fp32
copies of its largest single tensor + what Megatron's loader allocates while reading one input's
shard (at most one more shard); no rank ever holds a full state dict. The arithmetic,
``acc = w_0 * float(t_0)``, then ``acc = acc + w_i * float(t_i)`` in input order, rounded to
the parameter dtype once at the end, is elementwise: the result does not depend on the layouts.

Output. ``OUT`` becomes a save dir (``latest`` -> ``iter_0000000``) holding a weights-only
checkpoint (no optimizer state) whose ``prefpack.json`` has step 0, input A's objective and input
A's config with the merge's layout; ``OUT/merge.json`` records the merge: each input's path,
step, manifest digest and weight. ``prefpack train ... checkpoint.load=OUT`` starts a run from
its weights under any layout (weights only: ``load_optimizer`` does not apply); ``prefpack ref-logprobs
--load OUT`` and ``tools/export_hf_checkpoint.py --load OUT`` read it like any other. ``OUT``
must not exist or be empty.

Bad input (a missing or unusable input, a LoRA input, differing architectures, a weight count
that does not match, a non-finite weight, weights not summing to 1, an override outside
``parallel.*``, a non-empty output) stops before any work with exit status 2 and
``prefpack merge: <what>: <why>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MERGE_RECORD = "merge.json"
"""The file in the output save dir that records the merge (inputs, weights, layout)."""

NOT_ARCHITECTURE = frozenset(
    {
        "model.attention_backend",
        "model.init_method_std",
        "model.moe.aux_loss_coeff",
        "model.moe.expert_bias_update_rate",
    }
)
"""Model settings that may differ between inputs: they change how a model is trained or
computed, not what its weights are."""

SUM_TOLERANCE = 1e-6


class MergeError(ValueError):
    """Bad merge input; the message starts with the argument or file at fault."""


@dataclass(frozen=True)
class MergeInput:
    """One input checkpoint: its resolved iteration directory, what it records, and its weight."""

    path: Path
    state: Any
    """Its :class:`~megatron_prefpack.training.checkpoint.CheckpointState`."""
    config: Any
    """Its stored :class:`~megatron_prefpack.training.config.TrainConfig`."""
    weight: float


@dataclass(frozen=True)
class MergePlan:
    """A checked merge: the inputs in order (A first), the config of the output (input A's
    with the merge's layout) and the output save dir."""

    inputs: list[MergeInput]
    config: Any
    output: Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "example (Think-Fusion):\n"
        "  prefpack merge --input runs/think/checkpoints --input runs/plain/checkpoints \\\n"
        "      --weights 0.8 0.2 --output runs/fused\n"
        "  prefpack train --config next.yaml checkpoint.load=runs/fused\n"
        "large models: torchrun --nproc-per-node 8 $(which prefpack) merge ... --set parallel.expert=8\n\n"
        "Inputs may be saved under any TP/PP/EP layout; the output is written under this run's\n"
        "(world size and parallel.* overrides) and loads under any. Each rank holds its model\n"
        "shard and an fp32 accumulator of it, never a full state dict. Weights must sum to 1\n"
        "(--allow-any-sum to merge anyway). LoRA checkpoints: run prefpack merge-lora on each first.\n"
        "The output records the merge in OUT/merge.json."
    )
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="CKPT",
        help="a full checkpoint (a save dir: its latest; or an iteration dir); repeat, two or more, "
        "in the order of --weights; the first (A) gives the output's config",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        type=float,
        required=True,
        metavar="W",
        help="one real weight per --input, summing to 1 (e.g. 0.8 0.2)",
    )
    parser.add_argument("--output", required=True, help="save dir to write (must not exist or be empty)")
    parser.add_argument(
        "--allow-any-sum", action="store_true", help="merge even when the weights do not sum to 1"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the merge's layout: parallel.* only (e.g. parallel.tensor=2)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="like --set")


def run(args: argparse.Namespace) -> int:
    from megatron_prefpack.training.checkpoint import CheckpointError
    from megatron_prefpack.training.config import ConfigError

    try:
        merge_checkpoints(
            args.input,
            args.weights,
            Path(args.output),
            overrides=[*args.set, *args.overrides],
            allow_any_sum=args.allow_any_sum,
        )
    except (MergeError, ConfigError, CheckpointError) as err:
        print(f"prefpack merge: {err}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- checks


def _read_input(path: str | Path, weight: float) -> MergeInput:
    """The checkpoint at (or named by the ``latest`` of) ``path``, refused when it is missing,
    unreadable or a LoRA run's."""
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import config_from_yaml

    if not Path(path).exists():
        raise MergeError(f"--input {path}: no such checkpoint or save dir")
    ckpt = checkpoint.resolve(path)
    state = checkpoint.read_state(ckpt)
    if state.base is not None:
        raise MergeError(
            f"--input {ckpt}: a LoRA checkpoint (adapters only); merging adapters is not merging the "
            "models: fold them into a full checkpoint with prefpack merge-lora first, and merge that"
        )
    config = config_from_yaml(state.config_yaml, f"{ckpt / checkpoint.META}: config_yaml")
    return MergeInput(ckpt, state, config, weight)


def _check_weights(count: int, weights: Sequence[float], allow_any_sum: bool) -> None:
    if count < 2:
        raise MergeError(f"--input: {count} given: a merge needs two or more checkpoints")
    if len(weights) != count:
        raise MergeError(f"--weights: {len(weights)} given for {count} --input checkpoints: one per input")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise MergeError(f"--weights: {bad[0]} is not a finite number")
    total = math.fsum(weights)
    if abs(total - 1.0) > SUM_TOLERANCE and not allow_any_sum:
        raise MergeError(
            f"--weights: sum to {total:g}, not 1: that scales every weight of the model, norms "
            "included (interpolation, extrapolation and task arithmetic all sum to 1); "
            "give --allow-any-sum to merge anyway"
        )


def _check_same_model(first: MergeInput, other: MergeInput) -> None:
    """Refuse ``other`` unless its model is ``first``'s (resolved ``ModelConfig``, all but
    :data:`NOT_ARCHITECTURE`) and both or neither are reward models."""
    from megatron_prefpack.training.config import resume_changes

    changes = resume_changes(first.config, other.config)
    differing = [c for c in changes.refused if c.key.startswith("model.") and c.key not in NOT_ARCHITECTURE]
    if differing:
        listed = "; ".join(f"{c.key} is {c.new!r} there, {c.old!r} in {first.path}" for c in differing[:5])
        more = f" (and {len(differing) - 5} more)" if len(differing) > 5 else ""
        raise MergeError(f"--input {other.path}: another architecture than the first input: {listed}{more}")
    reward = [i.state.objective == "rm" for i in (first, other)]
    if reward[0] != reward[1]:
        kinds = ["a reward model (with its head)" if r else "a language model" for r in reward]
        raise MergeError(
            f"--input {other.path}: objective.type {other.state.objective!r}: {kinds[1]}, while "
            f"{first.path} ({first.state.objective!r}) is {kinds[0]}: their weights do not correspond"
        )


def _output_config(first: MergeInput, overrides: Sequence[str]) -> Any:
    """Input A's config with the merge's layout: ``parallel`` and ``performance`` at their
    defaults, then the ``parallel.*`` ``overrides``."""
    from megatron_prefpack.training.config import ParallelConfig, PerformanceConfig, apply_override

    cfg = dataclasses.replace(
        first.config,
        parallel=ParallelConfig(),
        performance=PerformanceConfig(),
        source="the merge's layout (world size, --set parallel.*)",
    )
    for override in overrides:
        key = override.partition("=")[0].strip()
        if not key.startswith("parallel."):
            raise MergeError(
                f"override {override!r}: only parallel.* keys can be set (the merge's layout); "
                "the model, objective and the rest are the first input's"
            )
        cfg = apply_override(cfg, override)
    return cfg


def _check_output(output: Path) -> None:
    """A merge writes a new save dir: ``output`` must not exist or be empty (so it holds no input)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise MergeError(
            f"--output {output}: exists and is not an empty directory (a merge writes a new one)"
        )


def plan_merge(
    inputs: Sequence[str | Path],
    weights: Sequence[float],
    output: Path,
    overrides: Sequence[str] = (),
    allow_any_sum: bool = False,
) -> MergePlan:
    """Check a merge without starting it (no process group, no model): the inputs, their
    architectures, the weights, the overrides and the output. Raises :class:`MergeError`,
    ``ConfigError`` or ``CheckpointError`` naming what is wrong."""
    _check_weights(len(inputs), weights, allow_any_sum)
    read = [_read_input(path, float(w)) for path, w in zip(inputs, weights, strict=True)]
    for other in read[1:]:
        _check_same_model(read[0], other)
    _check_output(output)
    return MergePlan(read, _output_config(read[0], overrides), output)


# ----------------------------------------------------------------------------- merge


def _layout(parallel: Any) -> str:
    """A parallel config in a few words (``TP2 EP2``)."""
    sizes = {"TP": parallel.tensor, "PP": parallel.pipeline, "EP": parallel.expert, "CP": parallel.context}
    return " ".join(f"{k}{v}" for k, v in sizes.items() if v > 1) or "no model parallelism"


def _accumulate(acc: dict[str, Any], chunks: list[Any], weight: float) -> None:
    """``acc[key] += weight * float(tensor)`` for every floating-point tensor of the chunks'
    state dicts (``acc`` starts empty: ``weight * float(tensor)``), one tensor at a time."""
    import torch

    for i, chunk in enumerate(chunks):
        for name, tensor in chunk.state_dict(keep_vars=True).items():
            if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
                continue
            term = tensor.detach().float() * weight
            key = f"{i}.{name}"
            if key in acc:
                acc[key] += term
            else:
                acc[key] = term


def _write_back(acc: dict[str, Any], chunks: list[Any], kept: list[dict[str, Any]]) -> None:
    """Copy the accumulated tensors into the chunks (rounded to their dtype once) and restore
    the entries that are not merged (``kept``: input A's, per chunk)."""
    import torch

    with torch.no_grad():
        for i, chunk in enumerate(chunks):
            for name, tensor in chunk.state_dict(keep_vars=True).items():
                if f"{i}.{name}" in acc:
                    tensor.copy_(acc.pop(f"{i}.{name}"))
            chunk.load_state_dict(kept[i], strict=False)


def _unmerged_entries(chunk: Any) -> dict[str, Any]:
    """The state-dict entries of ``chunk`` that are not floating-point tensors, copied."""
    import torch

    return {
        name: value.clone() if isinstance(value, torch.Tensor) else value
        for name, value in chunk.state_dict().items()
        if not (isinstance(value, torch.Tensor) and value.is_floating_point())
    }


def _write_record(plan: MergePlan, path: Path) -> None:
    """``merge.json`` in the output save dir, written atomically (rank 0)."""
    from megatron_prefpack.training import checkpoint

    record = {
        "version": 1,
        "checkpoint": path.name,
        "inputs": [{**checkpoint.identity(item.path), "weight": item.weight} for item in plan.inputs],
        "config_from": str(plan.inputs[0].path.resolve()),
        "parallel": dataclasses.asdict(plan.config.parallel),
    }
    tmp = plan.output / f".{MERGE_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, plan.output / MERGE_RECORD)


def run_merge(plan: MergePlan) -> Path:
    """Collective: carry out a checked ``plan`` (see the module docstring); returns the
    written checkpoint directory."""
    import torch.distributed as dist

    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import check_parallel_layout, model_config, to_yaml
    from megatron_prefpack.training.model_setup import build_chunks, init_distributed, transformer_config

    start = time.perf_counter()
    cfg = plan.config
    model_cfg = model_config(cfg)
    init_distributed(cfg)
    try:
        world = dist.get_world_size()
        check_parallel_layout(cfg, world, model_cfg)
        reward = plan.inputs[0].state.objective == "rm"
        chunks = build_chunks(model_cfg, transformer_config(cfg, model_cfg), reward_head=reward)
        weights = " + ".join(f"{item.weight:g} x input {i + 1}" for i, item in enumerate(plan.inputs))
        platform.progress("merge", f"{weights}, written by {world} rank(s) under {_layout(cfg.parallel)}")
        acc: dict[str, Any] = {}
        kept: list[dict[str, Any]] = []
        for i, item in enumerate(plan.inputs):
            tick = time.perf_counter()
            checkpoint.load(item.path, chunks, restore_rng=False)
            if i == 0:
                kept = [_unmerged_entries(chunk) for chunk in chunks]
            _accumulate(acc, chunks, item.weight)
            saved = f"step {item.state.step}, saved by {item.state.world_size} rank(s) under {_layout(item.config.parallel)}"
            platform.progress(
                "merge",
                f"input {i + 1}/{len(plan.inputs)} {item.path} ({saved}): weight {item.weight:g}, "
                f"added in {time.perf_counter() - tick:.1f} s",
            )
        _write_back(acc, chunks, kept)
        state = checkpoint.CheckpointState(
            step=0,
            consumed_rows=0,
            scheduler=None,
            objective=plan.inputs[0].state.objective,
            config_yaml=to_yaml(cfg),
            world_size=world,
        )
        path = checkpoint.save(plan.output, state, chunks, None, keep=0)
        if dist.get_rank() == 0:
            _write_record(plan, path)
        dist.barrier()
        platform.progress(
            "merge", f"wrote {path} (and {plan.output / MERGE_RECORD}) in {time.perf_counter() - start:.1f} s"
        )
    finally:
        platform.destroy()
    return path


def merge_checkpoints(
    inputs: Sequence[str | Path],
    weights: Sequence[float],
    output: Path,
    overrides: Sequence[str] = (),
    allow_any_sum: bool = False,
) -> Path:
    """Collective: :func:`plan_merge`, then :func:`run_merge`; returns the written checkpoint
    directory (``output/iter_0000000``)."""
    return run_merge(plan_merge(inputs, weights, Path(output), overrides, allow_any_sum))


def main() -> int:
    parser = argparse.ArgumentParser(prog="prefpack merge", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
