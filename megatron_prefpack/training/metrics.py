"""Training metrics: reduction over ranks, throughput and memory estimates, and the logs.

Sinks (written by global rank 0 only; values are made identical on every rank first, by
:func:`reduce_sums` and the collectives of the loop):

- ``<run.dir>/metrics.jsonl``: one JSON object per record, ``{"split": "train"|"eval",
  "step": int, "time": float, <name>: value, ...}``, names as the objective and the loop give
  them (``loss``, ``rewards/...``, ``lr``, ``mem/max_allocated_gib``, ...); a NaN or infinite
  value is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``, never hidden as ``null``;
- TensorBoard (``<run.dir>/tensorboard``, when installed and ``run.tensorboard``) and
  Weights & Biases (``run.wandb_project``): the same values as ``<split>/<name>``
  (``train/loss``, ``eval/loss``, ``train/mem/max_allocated_gib``); W&B plots them against
  ``train/global_step``;
- the console: every ``run.log_interval`` steps Megatron-LM's ``training_log`` line
  (`` [date time] iteration N/ M | consumed samples: ... | elapsed time per iteration (ms): ...
  | throughput per GPU (TFLOP/s/GPU): ... | learning rate: ... | global batch size: ... |
  <name>: ... | grad norm: ... | number of skipped iterations: ... | number of nan
  iterations: ... |``), Megatron's ``validation loss at iteration N`` block per evaluation,
  ``[prefpack] ...`` notes, and on request a tqdm progress bar on stderr.

Nothing here knows an objective's metric names: whatever the objective reports is logged.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
import torch.distributed as dist
import yaml

from megatron_prefpack.data import packing
from megatron_prefpack.data.layout import GroupPlacement

if TYPE_CHECKING:
    from megatron_prefpack.models.config import ModelConfig
    from megatron_prefpack.training.config import TrainConfig


def reduce_sums(sums: Mapping[str, float], contribute: bool, device: torch.device) -> dict[str, float]:
    """Add ``sums`` over all ranks; a rank with ``contribute=False`` adds zeros.

    Exactly one rank per data-parallel replica should contribute (the last pipeline stage,
    tensor- and context-parallel rank 0), so the result is the sum over the global batch.
    Every rank must pass the same keys in the same order."""
    keys = list(sums)
    values = torch.tensor([float(sums[k]) if contribute else 0.0 for k in keys], dtype=torch.float64)
    values = values.to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(keys, values.tolist(), strict=True))


def attention_pairs(groups: Iterable[GroupPlacement]) -> int:
    """Visible (query, key) pairs of a row's placements (pads excluded): the attention FLOP proxy."""
    total = 0
    for group in groups:
        prefix = group.prefix_length
        total += int(packing.causal_attention_pairs(prefix))
        total += sum(int(packing.segment_attention_pairs(seg.length, prefix)) for seg in group.segments)
    return total


def count_parameters(
    modules: Iterable[torch.nn.Module], moe_topk: int, num_experts: int, trainable_only: bool = False
) -> tuple[int, int]:
    """(total, active-per-token) parameters of the whole model, excluding input embeddings
    (``trainable_only``: of those with ``requires_grad``, e.g. a LoRA model's adapters).

    Collective over the world: each rank counts its shard and the counts are divided by the
    number of replicas of that shard (Megatron marks expert-parallel parameters
    ``allreduce=False``; they are replicated over the expert-data-parallel group). Routed
    expert parameters (``.mlp.experts.`` in the name) count ``moe_topk / num_experts``
    towards the active parameters; shared experts count fully. A parameter that every
    tensor-parallel rank holds whole (a layer norm, a column-parallel LoRA adapter's ``A``) is
    counted on tensor-parallel rank 0 only."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    # [replicated over DP x CP: dense, routed experts; replicated over expert DP: same]
    counts = torch.zeros(4, dtype=torch.float64)
    for module in modules:
        for name, param in module.named_parameters():
            if "word_embeddings" in name or (trainable_only and not param.requires_grad):
                continue
            if (
                dist.is_available()
                and dist.is_initialized()
                and not param_is_not_tensor_parallel_duplicate(param)
            ):
                continue
            slot = (0 if getattr(param, "allreduce", True) else 2) + (1 if ".mlp.experts." in name else 0)
            counts[slot] += param.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        counts[:2] /= ps.get_data_parallel_world_size(with_context_parallel=True)
        counts[2:] /= ps.get_expert_data_parallel_world_size()
    dense = float(counts[0] + counts[2])
    routed = float(counts[1] + counts[3])
    active = dense + (routed * moe_topk / num_experts if num_experts else routed)
    return int(dense + routed), int(active)


def attention_width(model_cfg: ModelConfig) -> float:
    """``attn_dim`` of :func:`step_flops` for a ``ModelConfig``: per visible pair and layer,
    QK^T costs 2 x (query/key width) and PV 2 x (value width) FLOPs over all heads, so
    ``attn_dim`` = heads x (qk + v head dims) / 2 (MLA: qk = nope + rope dims)."""
    heads = model_cfg.num_attention_heads
    if model_cfg.mla is not None:
        mla = model_cfg.mla
        return heads * (mla.qk_head_dim + mla.qk_pos_emb_head_dim + mla.v_head_dim) / 2
    return heads * (model_cfg.kv_channels or model_cfg.hidden_size // heads)


def step_flops(
    active_params: int, tokens: int, pairs: int, layers: int, attn_dim: float, passes: float
) -> float:
    """Estimated FLOPs of one step: 2 FLOPs per active parameter and token per forward, plus
    4 * attn_dim per visible attention pair and layer (QK^T and PV); ``passes`` counts the
    forward-equivalents (3 for forward + backward, +1 per extra forward, e.g. online reference)."""
    per_forward = 2.0 * active_params * tokens + 4.0 * attn_dim * pairs * layers
    return per_forward * passes


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak GPU memory of the job so far, in GiB, the maximum over all ranks:
    ``mem/max_allocated_gib`` (``torch.cuda.max_memory_allocated``: tensors) and
    ``mem/max_reserved_gib`` (``torch.cuda.max_memory_reserved``: what the caching allocator
    holds). Collective on a CUDA ``device`` (one MAX all-reduce when torch.distributed is up);
    ``{}`` on any other device, without touching ``torch.cuda``."""
    if device.type != "cuda":
        return {}
    peaks = [float(torch.cuda.max_memory_allocated(device)), float(torch.cuda.max_memory_reserved(device))]
    if dist.is_available() and dist.is_initialized():
        values = torch.tensor(peaks, dtype=torch.float64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        peaks = values.tolist()
    return {"mem/max_allocated_gib": peaks[0] / 2**30, "mem/max_reserved_gib": peaks[1] / 2**30}


# ----------------------------------------------------------------------------- one step's record


@dataclass(frozen=True)
class StepLog:
    """One training step as the logs report it: global values, identical on every rank."""

    step: int
    consumed_rows: int
    """Rows (Megatron's samples) trained on so far, this step's included."""
    losses: Mapping[str, float]
    """The objective's metric means and the MoE auxiliary losses, by the names they carry."""
    lr: float
    grad_norm: float | None
    """None: the optimizer reported none (the step was skipped)."""
    seconds: float
    """Wall time of the whole iteration: batches to the device, reference pass, step."""
    tokens: int
    groups: int
    flops: float
    """Estimated FLOPs of the step over all devices (:func:`step_flops`)."""
    devices: int
    skipped: bool
    """No update was applied (a non-finite step, or the optimizer declined it)."""
    nonfinite: bool
    nonfinite_steps: int
    """Non-finite steps in this run so far, this one included."""
    memory: Mapping[str, float] = field(default_factory=dict)
    """:func:`memory_metrics` (empty off CUDA)."""

    def metrics(self) -> dict[str, float]:
        """The flat record of ``metrics.jsonl`` (and, prefixed ``train/``, TensorBoard and W&B)."""
        grad_norm = float(self.grad_norm) if self.grad_norm is not None else float("nan")
        return {
            **self.losses,
            "lr": self.lr,
            "grad_norm": grad_norm,
            "nonfinite_steps": self.nonfinite_steps,
            "tokens_per_s": self.tokens / self.seconds,
            "groups_per_s": self.groups / self.seconds,
            "tflops_per_device": self.flops / self.seconds / self.devices / 1e12,
            "step_s": self.seconds,
            **self.memory,
        }


# ----------------------------------------------------------------------------- console lines


@dataclass
class _Interval:
    """The steps since the last console line (Megatron's ``total_loss_dict``): losses summed
    over the steps that applied an update, time and FLOPs over all of them."""

    steps: int = 0
    advanced: int = 0
    skipped: int = 0
    nonfinite: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    loss_sums: dict[str, float] = field(default_factory=dict)

    def add(self, record: StepLog) -> None:
        self.steps += 1
        self.skipped += int(record.skipped)
        self.nonfinite += int(record.nonfinite)
        self.seconds += record.seconds
        self.flops += record.flops
        if not record.skipped:
            self.advanced += 1
            for key, value in record.losses.items():
                self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        else:
            for key in record.losses:
                self.loss_sums.setdefault(key, 0.0)


def megatron_line(
    record: StepLog,
    interval: _Interval,
    train_steps: int,
    global_batch_size: int,
    now: datetime | None = None,
) -> str:
    """Megatron-LM's ``training_log`` console line for ``record``, the last step of
    ``interval``: time and throughput per iteration and the losses averaged over the interval
    (losses over the steps that applied an update, as Megatron does; ``NAN`` if none did),
    learning rate and grad norm of the last step, skipped and NaN steps counted in the interval;
    peak GPU memory at the end when known. Global batch size and consumed samples count rows."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
    per_iteration = interval.seconds / interval.steps
    throughput = interval.flops / interval.seconds / record.devices / 1e12
    parts = [
        f" [{stamp}] iteration {record.step:8d}/{train_steps:8d} |",
        f" consumed samples: {record.consumed_rows:12d} |",
        f" elapsed time per iteration (ms): {per_iteration * 1000.0:.1f} |",
        f" throughput per GPU (TFLOP/s/GPU): {throughput:.1f} |",
        f" learning rate: {record.lr:.6E} |",
        f" global batch size: {global_batch_size:5d} |",
    ]
    for key, total in interval.loss_sums.items():
        mean = total / interval.advanced if interval.advanced else float("nan")
        parts.append(f" {key}: {mean:.6E} |")
    if record.grad_norm is not None:
        parts.append(f" grad norm: {float(record.grad_norm):.3f} |")
    for key, value in record.memory.items():
        parts.append(f" {key}: {value:.2f} |")
    parts.append(f" number of skipped iterations: {interval.skipped:3d} |")
    parts.append(f" number of nan iterations: {interval.nonfinite:3d} |")
    return "".join(parts)


def validation_block(step: int, metrics: Mapping[str, float]) -> str:
    """Megatron-LM's evaluation printout: `` validation loss at iteration N | name value: X |``
    between two dashed rules (integers such as ``count`` printed as integers)."""
    line = f" validation loss at iteration {step} | " + "".join(
        f"{key} value: {value} | " if isinstance(value, int) else f"{key} value: {value:.6E} | "
        for key, value in metrics.items()
    )
    rule = "-" * (len(line) + 1)
    return f"{rule}\n{line}\n{rule}"


def progress_bar_enabled(setting: bool | str, stream: TextIO) -> bool:
    """``run.progress_bar``: True or False as given; ``"auto"``: whether ``stream`` is a
    terminal (so never in CI, batch jobs or piped output)."""
    if setting == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return bool(setting)


# ----------------------------------------------------------------------------- Weights & Biases

WANDB_STEP = "train/global_step"
"""The W&B x axis of every metric (the optimizer step, logged with each record: a resumed run
that logs a step again is not dropped as W&B drops non-increasing ``step=`` values)."""
WANDB_ID_FILE = "wandb_run_id"
"""``<run.dir>/wandb_run_id``: the W&B run id; a resumed run continues the same W&B run."""


class _WandbRun:
    """The W&B run of a training run (rank 0): ``wandb.init`` with the ``run.wandb_*`` keys,
    each unset one left to wandb (which reads ``WANDB_ENTITY``, ``WANDB_NAME``, ``WANDB_MODE``,
    ``WANDB_DIR``, ``WANDB_RUN_ID``, ``WANDB_API_KEY``, ...); files under ``run.wandb_dir``,
    else ``WANDB_DIR``, else the run dir. The run id is stored in the run dir the first time and
    reused (``resume="allow"``) afterwards."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        import wandb  # the config check ensured it is installed

        from megatron_prefpack.training.config import to_yaml

        run = cfg.run
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        directory = run.wandb_dir or (None if os.environ.get("WANDB_DIR") else str(run_dir))
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=run.wandb_project,
            entity=run.wandb_entity,
            name=run.wandb_name,
            mode=run.wandb_mode,
            dir=directory,
            id=run_id or None,
            resume="allow",
            config=yaml.safe_load(to_yaml(cfg)),
        )
        if not run_id:
            partial = id_file.with_name(id_file.name + ".tmp")
            partial.write_text(self._run.id + "\n")
            os.replace(partial, id_file)
        self._run.define_metric(WANDB_STEP)
        self._run.define_metric("*", step_metric=WANDB_STEP)

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log({**{f"{split}/{key}": value for key, value in metrics.items()}, WANDB_STEP: step})

    def close(self, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)


# ----------------------------------------------------------------------------- the logger


class MetricsLogger:
    """The logs of a training run (every method is a no-op unless ``enabled``: global rank 0).

    Each record goes to ``metrics.jsonl`` (names as given, with its ``split``), TensorBoard
    and W&B (as ``<split>/<name>``); :meth:`train` prints Megatron's console line every
    ``run.log_interval`` steps (also at the last step and at a non-finite one) and moves the
    progress bar; :meth:`eval` prints Megatron's validation block. With a progress bar, lines
    go through ``tqdm.write`` (stdout) so the bar (stderr) never splits them. A context
    manager: leaving closes every sink (a W&B run that ends in an exception is marked failed)."""

    def __init__(self, cfg: TrainConfig, enabled: bool) -> None:
        self.enabled = enabled
        self._train_steps = cfg.run.train_steps
        self._log_interval = cfg.run.log_interval
        self._global_batch_size = cfg.data.global_batch_size
        self._interval = _Interval()
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self._wandb: _WandbRun | None = None
        self._bar: Any = None
        self._bar_wanted = enabled and progress_bar_enabled(cfg.run.progress_bar, sys.stderr)
        if not enabled:
            return
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info("tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if cfg.run.wandb_project is not None:
            self._wandb = _WandbRun(cfg, run_dir)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(failed=exc_type is not None)

    def train(self, record: StepLog) -> None:
        """Record one training step; print the console line when it is due."""
        if not self.enabled:
            return
        self._record("train", record.step, record.metrics())
        self._interval.add(record)
        self._advance_bar(record)
        due = record.step % self._log_interval == 0 or record.step == self._train_steps
        if due or record.nonfinite:
            self._print(megatron_line(record, self._interval, self._train_steps, self._global_batch_size))
            self._interval = _Interval()

    def eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record and print one held-out evaluation at ``step``."""
        if not self.enabled:
            return
        self._record("eval", step, metrics)
        self._print(validation_block(step, metrics))

    def info(self, message: str) -> None:
        if self.enabled:
            self._print(f"[prefpack] {message}")

    def close(self, failed: bool = False) -> None:
        """Close every sink (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close(failed)
            self._wandb = None

    def _record(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        record = {"split": split, "step": step, "time": time.time()}
        record.update({k: _json_value(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(split, step, metrics)

    def _advance_bar(self, record: StepLog) -> None:
        if not self._bar_wanted:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._train_steps,
                initial=record.step - 1,
                desc="train",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        if "loss" in record.losses:
            self._bar.set_postfix(loss=f"{record.losses['loss']:.4f}", refresh=False)
        self._bar.update(1)

    def _print(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(text, flush=True)


def _json_value(value: float) -> float | str:
    """JSON has no NaN/inf: write them as strings that say what they were."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    return value
