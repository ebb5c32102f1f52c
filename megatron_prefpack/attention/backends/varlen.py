"""Varlen backend: the gather plan of :mod:`megatron_prefpack.attention.plans`, one kernel call.

Kernels, all given the same packed tensors and bottom-right causal sequences:

* ``flash_attn``: flash-attn ``flash_attn_varlen_func`` (``causal=True`` is bottom-right
  aligned since flash-attn 2.1);
* ``te``: Transformer Engine ``DotProductAttention``, THD, ``padding_causal_bottom_right``;
* ``torch``: ``torch.nn.attention.varlen.varlen_attn`` (torch's bundled flash kernel,
  ``window_size=(-1, 0)`` = bottom-right causal);
* ``loop``: plain torch, one SDPA per sequence; runs anywhere (CPU tests of the plan).

The GPU kernels need fp16/bf16 CUDA tensors and equal q/k and v head dims, so a differing
head dim (MLA: 192 vs 128) is zero-padded for the call and the output trimmed.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from megatron_prefpack.attention.backends.base import (
    AttentionBackend,
    BackendUnavailableError,
    check_shapes,
    expand_kv_heads,
)
from megatron_prefpack.attention.plans import VarlenPlan, build_varlen_plan

GPU_KERNELS = ("flash_attn", "te", "torch")
"""GPU kernels in order of preference."""

KERNELS = (*GPU_KERNELS, "loop")

_KERNEL_MODULES = {
    "flash_attn": "flash_attn",
    "te": "transformer_engine.pytorch",
    "torch": "torch.nn.attention.varlen",
}

INSTALL_HINTS = {
    "flash_attn": "install flash-attn: `pip install flash-attn --no-build-isolation` "
    "(or the gpu extra: `pip install 'megatron-prefpack[gpu]'`)",
    "te": "install Transformer Engine: `pip install --no-build-isolation 'transformer-engine[pytorch]'` "
    "(or the gpu extra: `pip install 'megatron-prefpack[gpu]'`)",
    "torch": "use a CUDA build of torch that has torch.nn.attention.varlen (torch >= 2.10)",
}

_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def kernel_importable(kernel: str) -> bool:
    """Whether the package behind a GPU ``kernel`` imports in this environment."""
    try:
        importlib.import_module(_KERNEL_MODULES[kernel])
    except Exception:  # GPU packages raise all sorts of errors (OSError, RuntimeError) without CUDA
        return False
    return True


def kernel_available(kernel: str) -> bool:
    """Whether ``kernel`` can run here: ``loop`` always; GPU kernels with CUDA and their package."""
    if kernel == "loop":
        return True
    return torch.cuda.is_available() and kernel_importable(kernel)


def unavailable_reason(kernel: str) -> str:
    """Why the GPU ``kernel`` cannot run here, and how to fix it."""
    if not torch.cuda.is_available():
        return f"varlen kernel {kernel!r} needs a CUDA device; none is available"
    return f"varlen kernel {kernel!r} is not installed: {INSTALL_HINTS[kernel]}"


def _pad_head_dims(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad the smaller of the q/k and v head dims so all three match (results unchanged)."""
    dim = max(q.shape[-1], v.shape[-1])
    return tuple(t if t.shape[-1] == dim else F.pad(t, (0, dim - t.shape[-1])) for t in (q, k, v))


def _flash_attn_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, softmax_scale: float
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    value_dim = v.shape[-1]
    q, k, v = _pad_head_dims(q, k, v)
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        plan.cu_seqlens_q,
        plan.cu_seqlens_k,
        plan.max_seqlen_q,
        plan.max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=softmax_scale,
        causal=True,
    )
    return out[..., :value_dim]


@functools.cache
def _te_attention(num_heads: int, num_kv_heads: int, head_dim: int, softmax_scale: float) -> Any:
    import transformer_engine.pytorch as te

    # "cross": the packed query and key sets differ (each segment's keys start with its prefix).
    return te.DotProductAttention(
        num_attention_heads=num_heads,
        kv_channels=head_dim,
        num_gqa_groups=num_kv_heads,
        attention_dropout=0.0,
        qkv_format="thd",
        attn_mask_type="padding_causal_bottom_right",
        attention_type="cross",
        softmax_scale=softmax_scale,
    )


def _te_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, softmax_scale: float
) -> torch.Tensor:
    value_dim = v.shape[-1]
    q, k, v = _pad_head_dims(q, k, v)
    attention = _te_attention(q.shape[1], k.shape[1], q.shape[2], softmax_scale)
    out = attention(
        q,
        k,
        v,
        cu_seqlens_q=plan.cu_seqlens_q,
        cu_seqlens_kv=plan.cu_seqlens_k,
        max_seqlen_q=plan.max_seqlen_q,
        max_seqlen_kv=plan.max_seqlen_k,
    )
    return out.view(q.shape[0], q.shape[1], -1)[..., :value_dim]


def _torch_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, softmax_scale: float
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    value_dim = v.shape[-1]
    q, k, v = _pad_head_dims(q, k, v)
    out = varlen_attn(
        q,
        k,
        v,
        plan.cu_seqlens_q,
        plan.cu_seqlens_k,
        plan.max_seqlen_q,
        plan.max_seqlen_k,
        scale=softmax_scale,
        window_size=(-1, 0),
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[..., :value_dim]


def _loop_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, softmax_scale: float
) -> torch.Tensor:
    num_heads = q.shape[1]
    cu_q, cu_k = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    outputs = [q.new_empty(0, num_heads, v.shape[-1])]
    for i in range(plan.num_sequences):
        q_i = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        k_i = expand_kv_heads(k[cu_k[i] : cu_k[i + 1]], num_heads).transpose(0, 1)
        v_i = expand_kv_heads(v[cu_k[i] : cu_k[i + 1]], num_heads).transpose(0, 1)
        len_q, len_k = q_i.shape[1], k_i.shape[1]
        positions_k = torch.arange(len_k, device=q.device)
        positions_q = torch.arange(len_q, device=q.device)
        bottom_right_causal = positions_k[None, :] <= positions_q[:, None] + (len_k - len_q)
        out = F.scaled_dot_product_attention(
            q_i, k_i, v_i, attn_mask=bottom_right_causal, scale=softmax_scale
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


_KERNEL_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "flash_attn": _flash_attn_kernel,
    "te": _te_kernel,
    "torch": _torch_kernel,
    "loop": _loop_kernel,
}


class VarlenBackend(AttentionBackend):
    """Plan: :class:`~megatron_prefpack.attention.plans.VarlenPlan`.

    ``kernel=None`` picks per call: the first available of :data:`GPU_KERNELS` for fp16/bf16
    CUDA tensors, else ``loop`` (warning once when CUDA tensors are fp32).
    An explicit ``kernel`` that cannot run here raises :class:`BackendUnavailableError`.
    """

    def __init__(self, kernel: str | None = None) -> None:
        if kernel is not None:
            if kernel not in KERNELS:
                raise ValueError(f"unknown varlen kernel {kernel!r}; choose from {KERNELS}")
            if not kernel_available(kernel):
                raise BackendUnavailableError(unavailable_reason(kernel))
        self.kernel = kernel
        self.name = "varlen" if kernel is None else f"varlen:{kernel}"
        self._warned_fp32 = False

    def build_plan(
        self, doc_ids: torch.Tensor, segment_ids: torch.Tensor, q_index: torch.Tensor | None = None
    ) -> VarlenPlan:
        return build_varlen_plan(doc_ids, segment_ids, q_index)

    def kernel_for(self, q: torch.Tensor) -> str:
        """The kernel that runs for query tensor ``q`` (device and dtype decide)."""
        if self.kernel is not None:
            if self.kernel != "loop" and (not q.is_cuda or q.dtype not in _HALF_DTYPES):
                raise ValueError(
                    f"varlen kernel {self.kernel!r} needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}"
                )
            return self.kernel
        if not q.is_cuda:
            return "loop"
        if q.dtype not in _HALF_DTYPES:
            if not self._warned_fp32:
                warnings.warn(
                    f"varlen attention on {q.dtype} CUDA tensors runs the slow loop kernel", stacklevel=2
                )
                self._warned_fp32 = True
            return "loop"
        for kernel in GPU_KERNELS:
            if kernel_importable(kernel):
                return kernel
        raise BackendUnavailableError(
            "no varlen GPU kernel is installed; " + "; or ".join(INSTALL_HINTS[k] for k in GPU_KERNELS)
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, softmax_scale: float
    ) -> torch.Tensor:
        check_shapes(q, k, v)
        batch, num_q, num_heads, _ = q.shape
        if (batch, num_q, k.shape[1]) != (plan.batch, plan.num_queries, plan.num_keys):
            raise ValueError(
                f"plan is for (B, Sq, S) = {(plan.batch, plan.num_queries, plan.num_keys)}, "
                f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        q_flat = q.reshape(batch * num_q, num_heads, q.shape[-1])
        k_flat = k.reshape(-1, k.shape[2], k.shape[3])
        v_flat = v.reshape(-1, v.shape[2], v.shape[3])
        q_packed = q_flat if plan.q_gather is None else q_flat.index_select(0, plan.q_gather)
        out = _KERNEL_FUNCTIONS[self.kernel_for(q)](
            q_packed,
            k_flat.index_select(0, plan.kv_gather),
            v_flat.index_select(0, plan.kv_gather),
            plan,
            softmax_scale,
        )
        if plan.output_index is not None:
            pad_out = expand_kv_heads(v_flat.index_select(0, plan.pad_kv), num_heads)
            out = torch.cat([out, pad_out]).index_select(0, plan.output_index)
        return out.view(batch, num_q, num_heads, v.shape[-1])
