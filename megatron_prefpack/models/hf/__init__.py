"""Hugging Face checkpoints <-> this package's Megatron-Core model, one module per ``model_type``.

``ARCHITECTURES`` maps a ``config.json`` ``model_type`` to its :class:`Architecture`
(``config.json`` <-> :class:`ModelConfig`, per-parameter rules both ways). Used by
``tools/convert_hf_checkpoint.py`` (import) and ``tools/export_hf_checkpoint.py`` (export).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_prefpack.data.json_files import read_json_object
from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.hf import axk1, deepseek_v3, glm4_moe, llama, qwen3, qwen3_moe
from megatron_prefpack.models.hf.fields import ConversionError
from megatron_prefpack.models.hf.mapping import Architecture
from megatron_prefpack.models.hf.safetensors_io import SafetensorsCheckpoint
from megatron_prefpack.models.hf.transfer import build_slice, fill_model, hf_tensors

ARCHITECTURES: dict[str, Architecture] = {
    m.ARCHITECTURE.model_type: m.ARCHITECTURE for m in (deepseek_v3, axk1, llama, qwen3, qwen3_moe, glm4_moe)
}
"""In the order an export without a source config tries them."""

CONFIG_FILE = "config.json"

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ConversionError",
    "SafetensorsCheckpoint",
    "architecture",
    "build_slice",
    "fill_model",
    "generated_hf_config",
    "hf_tensors",
    "model_config_from_hf",
    "read_hf_config",
    "read_model_config",
]


def architecture(hf: dict[str, Any]) -> Architecture:
    """The architecture of a ``config.json`` dict, by its ``model_type``."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"model_type={model_type!r}: not one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def model_config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """The validated :class:`ModelConfig` of a ``config.json`` dict; :class:`ConversionError`
    names the field when the model cannot be translated exactly."""
    try:
        cfg = dataclasses.replace(architecture(hf).model_config(hf), name=name)
        cfg.validate()
    except ConversionError:
        raise
    except ValueError as err:
        raise ConversionError(str(err)) from err
    return cfg


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """``directory/config.json`` as a dict (``ConversionError`` ``"<path>: reason"``)."""
    return read_json_object(Path(directory) / CONFIG_FILE, ConversionError)


def read_model_config(directory: str | Path) -> tuple[Architecture, ModelConfig]:
    """Architecture and :class:`ModelConfig` of ``directory/config.json`` (named after the
    directory); errors are :class:`ConversionError` ``"<path>: reason"``."""
    path = Path(directory) / CONFIG_FILE
    hf = read_hf_config(directory)
    try:
        return architecture(hf), model_config_from_hf(hf, name=Path(directory).name)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from err


_NOT_ARCHITECTURE = ("name", "params_dtype", "attention_backend", "init_method_std")
_NOT_ARCHITECTURE_MOE = ("expert_bias_update_rate", "aux_loss_coeff", "first_k_dense", "dense_layers")


def _architecture_fields(cfg: ModelConfig) -> dict[str, Any]:
    """``cfg`` flattened to dotted keys, without the fields that do not change the weights'
    meaning (training and runtime settings); dense/MoE layer placement as one pattern."""
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = value

    data = dataclasses.asdict(cfg)
    for key in _NOT_ARCHITECTURE:
        data.pop(key)
    for key in _NOT_ARCHITECTURE_MOE:
        (data.get("moe") or {}).pop(key, None)
    walk(data, "")
    if cfg.moe is not None:
        flat["moe.layer_pattern"] = cfg.moe_layer_pattern()
    return flat


def differing_fields(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``"field: a_value != b_value"`` for every architecture field where ``a`` and ``b`` differ."""
    fa, fb = _architecture_fields(a), _architecture_fields(b)
    return [
        f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)
    ]


def generated_hf_config(arch: Architecture, cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` for ``cfg`` as ``arch``, checked to read back as the same model (else
    :class:`ConversionError` listing the fields the architecture cannot express)."""
    hf = arch.hf_config(cfg)
    differing = differing_fields(cfg, arch.model_config(hf))
    if differing:
        raise ConversionError(f"{arch.model_type} cannot express this model: {'; '.join(differing)}")
    return hf
