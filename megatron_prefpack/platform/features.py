"""What this machine can run: CUDA and the optional GPU libraries (Transformer Engine, DeepEP,
grouped_gemm). Checked without importing the libraries (their imports are slow or fail on CPU)."""

from __future__ import annotations

import importlib.util

import torch


def has_cuda() -> bool:
    """A CUDA device is visible to torch."""
    return torch.cuda.is_available()


def installed(module: str) -> bool:
    """``module`` (a top-level package name) is importable."""
    return importlib.util.find_spec(module) is not None


def has_transformer_engine() -> bool:
    """Transformer Engine's layers can run: CUDA present and ``transformer_engine`` installed."""
    return has_cuda() and installed("transformer_engine")


def missing_for(needs: tuple[str, ...]) -> str | None:
    """Why a feature needing ``needs`` (``"cuda"`` or top-level module names such as
    ``"transformer_engine"``, ``"deep_ep"``) cannot run here, or None when it can."""
    missing = [name for name in needs if not (has_cuda() if name == "cuda" else installed(name))]
    if not missing:
        return None
    words = {
        "cuda": "a CUDA GPU",
        "transformer_engine": "Transformer Engine",
        "deep_ep": "DeepEP (deep_ep)",
        "fused_weight_gradient_mlp_cuda": "apex's fused_weight_gradient_mlp_cuda",
    }
    return "needs " + " and ".join(words.get(name, name) for name in missing) + ", not available here"
