"""Training metrics: reduction over ranks, throughput estimates, and the three sinks.

Every record goes to ``<run_dir>/metrics.jsonl`` (one JSON object per line:
``{"split": "train"|"eval", "step": int, "time": float, ...}``; a NaN or infinite value is
written as the string ``"nan"``, ``"inf"`` or ``"-inf"``, never hidden as ``null``), TensorBoard event files in
``<run_dir>/tensorboard`` when ``tensorboard`` is installed and enabled, and, when asked
(every ``run.log_interval`` steps), the console as one line. Only the
rank that owns the logger (global rank 0) writes; metric values are made identical on every
rank first by :func:`reduce_sums`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_prefpack.data import packing
from megatron_prefpack.data.layout import GroupPlacement

if TYPE_CHECKING:
    from megatron_prefpack.models.config import ModelConfig


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


class MetricsLogger:
    """Writes metric records to the console, JSONL and TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("[prefpack] tensorboard is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, split: str, step: int, metrics: Mapping[str, float], console: bool = True) -> None:
        """Record ``metrics`` for ``step`` in the files; print them too when ``console``."""
        if not self.enabled:
            return
        record = {"split": split, "step": step, "time": time.time()}
        record.update({k: _json_value(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
            self._tb.flush()
        if console:
            print(format_line(split, step, metrics), flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[prefpack] {message}", flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _json_value(value: float) -> float | str:
    """JSON has no NaN/inf: write them as strings that say what they were."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    return value


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def format_line(split: str, step: int, metrics: Mapping[str, float]) -> str:
    """``[train] step 12 | loss 0.6931 | acc 0.5000 | ...`` for the console."""
    parts = [f"[{split}] step {step}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]
    return " | ".join(parts)
