"""LoRA adapters on Megatron-Core's tensor-parallel linears, under TP / SP / EP / PP.

:func:`apply_lora` wraps the target linears of every decoder layer of a built model chunk in
:class:`LoRALinear`: ``y = W x + (alpha / rank) * B A dropout(x)``, ``A`` of shape
``(rank, in)``, ``B`` of shape ``(out, rank)``, ``B = 0`` at first (the model starts as the base
model bit for bit). Sharding follows the wrapped layer:

* column-parallel (``W`` split on its output): ``A`` replicated, ``B`` split on its output like
  ``W``. Under sequence parallelism ``A`` runs on this rank's sequence shard and the rank-``r``
  result is all-gathered (not the hidden-size input). ``gather_output`` is respected.
* row-parallel (``W`` split on its input): ``A`` split on its input like ``W``, ``B``
  replicated; the rank-``r`` partial products are summed over TP before ``B`` (all-reduce, or a
  reduce-scatter to the sequence shard under SP). ``input_is_parallel`` is respected.
* routed experts (``SequentialMLP``, ``routed_experts: true``): one adapter per expert, sharded
  over EP with its expert and over the expert-TP group like the expert's weights; the token
  dispatcher gathers and reduces around the experts, so the adapter adds its partial product as
  the expert's own linears do (no communication of its own).

Every adapter gradient is complete on every rank that holds the parameter (no reliance on
``finalize_model_grads``): where a replicated factor only sees part of the tokens or part of the
output (``A`` under SP or in an expert's column linear, ``B`` under SP or in an expert's row
linear), its weight gradient is summed over the TP group in the backward pass (a rank-``r`` by
hidden all-reduce). Adapter parameters carry Megatron's ``tensor_model_parallel`` /
``partition_dim`` attributes (gradient-norm de-duplication) and the base weight's ``allreduce``
flag (expert parameters go to DDP's expert buffers).

Initialisation is layout-independent: ``A`` is drawn like PEFT's (kaiming-uniform with
``a = sqrt(5)``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``) as a full tensor from a generator seeded by
the module's global name (``layer{global layer number}.{path}``, routed experts by their global
index), and each rank keeps its shard; so every layout builds the same model as one process.

Checkpoints: :meth:`LoRALinear.sharded_state_dict` returns the base layer's entries under the
same keys as the unwrapped model (a base checkpoint loads unchanged) plus ``{prefix}lora_A`` and
``{prefix}lora_B`` with their TP (and, through ``SequentialMLP``, EP) sharding; a SwiGLU
``linear_fc1``'s ``lora_B`` is split into its gate and up halves as Megatron splits the weight.
``state_dict()`` likewise hides the ``base.`` level. :func:`merge_adapters` folds the adapters
into the weights and unwraps, leaving the plain model.

Not adapted: embeddings, the output layer and a reward head (``output_layer`` could become a
target later: it is column-parallel like the others). Only Megatron's local linears are
supported; Transformer Engine's (the TE layer spec, including its layer-norm-fused linears) and
grouped-GEMM experts are refused with a clear error.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_prefpack.models.config import LoRAConfig, ModelConfigError

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "adapters_disabled",
    "apply_lora",
    "freeze_base",
    "is_adapter_parameter",
    "lora_modules",
    "merge_adapters",
]

ADAPTER_PARAMETERS = ("lora_A", "lora_B")


class _LinearSummedWeightGrad(torch.autograd.Function):
    """``x @ w.T``; the backward pass sums ``w``'s gradient over ``group``.

    For a factor replicated over ``group`` whose local gradient is partial: each rank saw only
    its sequence shard, or contributed only its share of a sum the caller reduces elsewhere.
    The input gradient is this rank's own (``g @ w``), as for any linear.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            torch.distributed.all_reduce(grad_w, group=ctx.group)
        return grad_x, grad_w, None


def _linear(x: torch.Tensor, weight: torch.Tensor, sum_grad_over: Any) -> torch.Tensor:
    """``x @ weight.T``, summing ``weight``'s gradient over ``sum_grad_over`` (None: no reduction)."""
    if sum_grad_over is None:
        return F.linear(x, weight)
    return _LinearSummedWeightGrad.apply(x, weight, sum_grad_over)


class LoRALinear(torch.nn.Module):
    """A Megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` (attention projections incl.
    MLA's, MLPs, shared and routed experts) with a low-rank adapter.

    ``forward(x, *args, **kwargs)`` -> ``(base_out + scale * B(A(dropout(x))), bias)``: the base
    layer's own ``(output, bias)`` (``skip_bias_add`` as it was) with the adapter's contribution
    added in the output's layout (sequence shard, gathered output, expert partial sum). With
    ``enabled = False`` (see :func:`adapters_disabled`) it is exactly the base layer.

    Parameters: ``base`` (the wrapped module, its parameters under ``base.``), ``lora_A``
    (``(rank, in)``, or ``(rank, in / tp)`` for a row-parallel layer) and ``lora_B``
    (``(out / tp, rank)`` for a column-parallel layer, else ``(out, rank)``), in the base weight's
    dtype and device. Attributes not found on the wrapper are looked up on ``base`` (Megatron's
    modules read e.g. ``config`` or ``tp_group`` off their linears).

    ``key`` names the module in the whole model (``layer3.mlp.experts.5.linear_fc1``); it seeds
    ``A``'s initial values. ``swiglu``: the base is a gated ``linear_fc1`` whose output rows are
    ``[gate; up]`` shards, which ``lora_B`` follows (its checkpoint entry is split like the weight's).
    """

    def __init__(
        self,
        base: ColumnParallelLinear | RowParallelLinear,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        key: str,
        swiglu: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, ColumnParallelLinear | RowParallelLinear):
            raise TypeError(
                f"LoRALinear wraps Megatron's ColumnParallelLinear/RowParallelLinear, got {type(base)}"
            )
        self.base = base
        self.column = isinstance(base, ColumnParallelLinear)
        self.scale = alpha / rank
        self.key = key
        self.swiglu = swiglu
        self.enabled = True
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        group = base.tp_group
        tp_size, tp_rank = group.size(), group.rank()
        # Expert linears leave gathering and reducing to the token dispatcher.
        self.expert_comm = bool(base.explicit_expert_comm)
        # Named apart from the base's own attributes, which callers read through the wrapper.
        self.adapter_sp = bool(base.sequence_parallel) and tp_size > 1 and not self.expert_comm
        self.adapter_group = group if tp_size > 1 else None
        weight = base.weight
        factory = {"dtype": weight.dtype, "device": weight.device}
        full_a = _initial_a(key, rank, base.input_size)
        if self.column:
            local_a = full_a
            local_b_rows = base.output_size_per_partition
        else:
            width = base.input_size_per_partition
            local_a = full_a[:, tp_rank * width : (tp_rank + 1) * width]
            local_b_rows = base.output_size
        self.lora_A = torch.nn.Parameter(local_a.to(**factory).contiguous())
        self.lora_B = torch.nn.Parameter(torch.zeros(local_b_rows, rank, **factory))
        # Megatron's conventions: which factor is split (grad norms count it on every TP rank)
        # and whether it belongs with the experts (DDP's expert buffers, expert-DP reduction).
        set_tensor_model_parallel_attributes(
            self.lora_B if self.column else self.lora_A, True, 0 if self.column else 1, 1
        )
        for param in (self.lora_A, self.lora_B):
            param.allreduce = getattr(weight, "allreduce", True)
        self.register_state_dict_post_hook(_hide_base_level)
        self.register_load_state_dict_pre_hook(_restore_base_level)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self._modules["base"], name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        output, bias = self.base(x, *args, **kwargs)
        if not self.enabled:
            return output, bias
        h = self.lora_dropout(x)
        if self.column:
            delta = self._column_delta(h, kwargs.get("runtime_gather_output"))
        else:
            delta = self._row_delta(h)
        return output + delta.to(output.dtype), bias

    def _column_delta(self, h: torch.Tensor, runtime_gather_output: bool | None) -> torch.Tensor:
        group = self.adapter_group
        if group is None:
            a = F.linear(h, self.lora_A)
        elif self.adapter_sp:
            # A on the sequence shard (its gradient summed over the shards), then gather rank-r.
            a = _linear(h, self.lora_A, group)
            a = mappings.gather_from_sequence_parallel_region(
                a, tensor_parallel_output_grad=True, group=group
            )
        elif self.expert_comm or self.base.disable_grad_reduce:
            # Input replicated, its gradient reduced by the caller: each rank adds B_i's share.
            a = _linear(h, self.lora_A, group)
        else:
            # Input replicated with a complete gradient: all-reduce d(a) in the backward pass.
            a = mappings.copy_to_tensor_model_parallel_region(F.linear(h, self.lora_A), group=group)
        delta = F.linear(a, self.lora_B) * self.scale
        gather = self.base.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and group is not None:
            delta = mappings.gather_from_tensor_model_parallel_region(delta, group=group)
        return delta

    def _row_delta(self, h: torch.Tensor) -> torch.Tensor:
        group = self.adapter_group
        if group is None:
            return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale
        if not self.base.input_is_parallel:
            h = mappings.scatter_to_tensor_model_parallel_region(h, group=group)
        a = F.linear(h, self.lora_A)  # this rank's partial sum over the input
        if self.expert_comm:
            # The dispatcher sums the experts' partial outputs over expert-TP: so does B a_i.
            delta = _linear(a, self.lora_B, group)
        elif self.adapter_sp:
            a = mappings.reduce_scatter_to_sequence_parallel_region(a, group=group)
            delta = _linear(a, self.lora_B, group)
        else:
            delta = F.linear(mappings.reduce_from_tensor_model_parallel_region(a, group=group), self.lora_B)
        return delta * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of ``W + scale * B @ A`` (computed in fp32, in ``W``'s dtype)."""
        weight = self.base.weight
        update = self.scale * (self.lora_B.float() @ self.lora_A.float())
        return (weight.float() + update).to(weight.dtype)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """The base layer's entries under ``prefix`` (as unwrapped) + ``lora_A`` / ``lora_B``."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        adapters = make_sharded_tensors_for_checkpoint(
            {name: getattr(self, name) for name in ADAPTER_PARAMETERS},
            prefix,
            {"lora_B": 0} if self.column else {"lora_A": 1},
            sharded_offsets,
            tp_group=self.base.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        if self.swiglu:
            key = f"{prefix}lora_B"
            adapters[key] = apply_swiglu_sharded_factory(
                adapters[key], sharded_offsets, metadata.get("singleton_local_shards", False)
            )
        state.update(adapters)
        return state

    def extra_repr(self) -> str:
        return f"key={self.key}, rank={self.lora_A.shape[0]}, scale={self.scale:g}, enabled={self.enabled}"


def _initial_a(key: str, rank: int, in_features: int) -> torch.Tensor:
    """The full ``A`` of module ``key``: PEFT's kaiming-uniform (a = sqrt(5)), seeded by ``key``."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"lora_A:{key}".encode()))
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(rank, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def _hide_base_level(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: ``{prefix}base.weight`` -> ``{prefix}weight`` (the unwrapped key)."""
    inner = f"{prefix}base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _restore_base_level(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook, the inverse of :func:`_hide_base_level`."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if "." not in rest and rest not in ADAPTER_PARAMETERS:
            state_dict[f"{prefix}base.{rest}"] = state_dict.pop(key)


def _targets(layer: TransformerLayer, lora: LoRAConfig) -> Iterator[tuple[str, str, torch.nn.Module]]:
    """``(path in layer, global key, module)`` of the linears to adapt in one decoder layer."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    wanted = set(lora.target_modules)
    for path, module in layer.named_modules():
        parts = path.split(".")
        routed = len(parts) >= 2 and parts[-2:] == ["mlp", "experts"] and lora.routed_experts
        if routed and not isinstance(module, SequentialMLP):
            raise ModelConfigError(
                "lora.routed_experts",
                "routed-expert adapters need per-expert linears (SequentialMLP, moe_grouped_gemm off); "
                f"layer {layer.layer_number} has {type(module).__name__}",
            )
        if parts[-1] not in wanted:
            continue
        key = path
        if "local_experts" in parts:
            if not lora.routed_experts:
                continue
            at = parts.index("local_experts")
            experts = layer.get_submodule(".".join(parts[:at]))
            first = experts.ep_group.rank() * experts.num_local_experts
            key = ".".join([*parts[: at - 1], "experts", str(first + int(parts[at + 1])), *parts[at + 2 :]])
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            raise ModelConfigError(
                "lora.target_modules",
                f"layer {layer.layer_number} {path} is a {type(module).__name__}; LoRA supports Megatron's "
                "local ColumnParallelLinear/RowParallelLinear only (not Transformer Engine's linears)",
            )
        yield path, f"layer{layer.layer_number}.{key}", module


def apply_lora(model: torch.nn.Module, lora: LoRAConfig) -> int:
    """Wrap the target linears of every decoder layer of ``model`` (one model chunk) in
    :class:`LoRALinear`, in place; return how many were wrapped on this rank.

    Raises :class:`ModelConfigError` (key ``lora.*``) for a bad config, a model that is already
    adapted, Transformer Engine linears, or grouped-GEMM experts with ``routed_experts``.
    """
    lora.validate()
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ModelConfigError("lora", "the model already has LoRA adapters")
    config = getattr(model, "config", None)
    gated = bool(getattr(config, "gated_linear_unit", False))
    count = 0
    for layer in [m for m in model.modules() if isinstance(m, TransformerLayer)]:
        for path, key, module in list(_targets(layer, lora)):
            parent_path, _, leaf = path.rpartition(".")
            wrapper = LoRALinear(
                module,
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=lora.dropout,
                key=key,
                swiglu=gated and leaf == "linear_fc1",
            )
            setattr(layer.get_submodule(parent_path), leaf, wrapper)
            count += 1
    return count


def lora_modules(chunks: torch.nn.Module | Iterable[torch.nn.Module]) -> list[LoRALinear]:
    """Every :class:`LoRALinear` in ``chunks`` (a module or model chunks, wrapped or not)."""
    if isinstance(chunks, torch.nn.Module):
        chunks = [chunks]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(chunks: torch.nn.Module | Iterable[torch.nn.Module]) -> Iterator[None]:
    """Within the block every adapter in ``chunks`` is off: the forward is the base model's,
    exactly (the DPO reference). Restores each adapter's previous state on exit."""
    modules = lora_modules(chunks)
    previous = [m.enabled for m in modules]
    for module in modules:
        module.enabled = False
    try:
        yield
    finally:
        for module, enabled in zip(modules, previous, strict=True):
            module.enabled = enabled


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name (as ``named_parameters`` gives it) is a LoRA factor."""
    return any(part in ADAPTER_PARAMETERS for part in name.split("."))


def freeze_base(
    chunks: torch.nn.Module | Iterable[torch.nn.Module],
    trainable: Callable[[str], bool] = is_adapter_parameter,
) -> tuple[int, int]:
    """Set ``requires_grad`` to ``trainable(name)`` for every parameter of ``chunks`` (adapters
    only by default; pass a predicate to keep e.g. a reward head trainable). Call it before
    wrapping in Megatron's DDP, which buffers only trainable parameters. Returns this rank's
    ``(trainable, frozen)`` parameter counts (elements)."""
    if isinstance(chunks, torch.nn.Module):
        chunks = [chunks]
    counts = [0, 0]
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            keep = bool(trainable(name))
            param.requires_grad_(keep)
            counts[0 if keep else 1] += param.numel()
    return counts[0], counts[1]


@torch.no_grad()
def merge_adapters(chunks: torch.nn.Module | Iterable[torch.nn.Module]) -> None:
    """Fold every adapter into its weight (``W += scale * B @ A``, per shard) and put the base
    layer back in its place: the chunks become plain Megatron models whose ``state_dict`` and
    ``sharded_state_dict`` keys are the unwrapped model's. ``requires_grad`` is left as it was."""
    if isinstance(chunks, torch.nn.Module):
        chunks = [chunks]
    for chunk in chunks:
        for path, module in [(p, m) for p, m in chunk.named_modules() if isinstance(m, LoRALinear)]:
            module.base.weight.copy_(module.merged_weight())
            parent_path, _, leaf = path.rpartition(".")
            setattr(chunk.get_submodule(parent_path), leaf, module.base)
