"""What this Python environment offers the GPU check: one JSON object on stdout.

Keys: ``python`` (executable), ``python_version``, ``torch``, ``cuda`` (torch's CUDA build,
None for a CPU build), ``cuda_available``, ``gpu`` (device 0's name), ``gpu_count``,
``gpu_memory_bytes``, ``megatron_core`` (version; the path it loads from in
``megatron_core_path``), ``transformer_engine``, ``flash_attn``, ``sentencepiece``, ``pytest``,
``megatron_prefpack`` (where the package loads from). A missing package is ``None`` and its
import error is in ``errors``. Never fails: a probe that cannot import torch says so.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
from typing import Any


def _version(module: str, errors: dict[str, str]) -> tuple[str | None, str | None]:
    """(version or "unknown", file) of an importable module; (None, None) and the error otherwise."""
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # an import can fail in many ways (ImportError, OSError of a .so, ...)
        errors[module] = f"{type(err).__name__}: {err}"
        return None, None
    return str(getattr(mod, "__version__", "unknown")), getattr(mod, "__file__", None)


def probe() -> dict[str, Any]:
    errors: dict[str, str] = {}
    info: dict[str, Any] = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "errors": errors,
    }
    info["torch"], _ = _version("torch", errors)
    info.update(cuda=None, cuda_available=False, gpu=None, gpu_count=0, gpu_memory_bytes=None)
    if info["torch"] is not None:
        import torch

        info["cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    info["megatron_core"], info["megatron_core_path"] = _version("megatron.core", errors)
    for key, module in (
        ("transformer_engine", "transformer_engine"),
        ("flash_attn", "flash_attn"),
        ("sentencepiece", "sentencepiece"),
        ("pytest", "pytest"),
    ):
        info[key], _ = _version(module, errors)
    _, info["megatron_prefpack"] = _version("megatron_prefpack", errors)
    return info


if __name__ == "__main__":
    print(json.dumps(probe()))
