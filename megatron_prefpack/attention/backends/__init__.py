"""Attention backends by name, and ``auto`` selection.

Names: ``reference``, ``varlen`` (best kernel per call), ``varlen:flash_attn``, ``varlen:te``,
``varlen:torch``, ``varlen:loop``, ``flex``, and ``auto``: on CUDA ``varlen`` if a varlen GPU
kernel is installed, else ``flex``; on CPU ``reference``.
"""

from __future__ import annotations

import functools

import torch

from megatron_prefpack.attention.backends.base import (
    AttentionBackend,
    BackendUnavailableError,
    check_shapes,
    expand_kv_heads,
)
from megatron_prefpack.attention.backends.flex import FlexBackend
from megatron_prefpack.attention.backends.reference import ReferenceBackend
from megatron_prefpack.attention.backends.varlen import GPU_KERNELS, KERNELS, VarlenBackend, kernel_available

BACKEND_NAMES = ("auto", "reference", "varlen", *(f"varlen:{k}" for k in KERNELS), "flex")

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "BackendUnavailableError",
    "check_shapes",
    "expand_kv_heads",
    "get_backend",
    "resolve_backend_name",
]


def resolve_backend_name(name: str, device: torch.device | str | None = None) -> str:
    """The concrete backend name ``name`` stands for on ``device`` (default: CUDA if present)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    if name != "auto":
        return name
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type != "cuda":
        return "reference"
    return "varlen" if any(kernel_available(k) for k in GPU_KERNELS) else "flex"


@functools.cache
def _backend(name: str) -> AttentionBackend:
    if name == "reference":
        return ReferenceBackend()
    if name == "flex":
        return FlexBackend()
    kernel = name.partition(":")[2]
    return VarlenBackend(kernel or None)


def get_backend(name: str = "auto", device: torch.device | str | None = None) -> AttentionBackend:
    """The backend called ``name`` (one shared instance per concrete name).

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailableError`, with
    install instructions, for one that cannot run here.
    """
    return _backend(resolve_backend_name(name, device))
