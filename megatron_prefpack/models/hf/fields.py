"""Reading a Hugging Face ``config.json`` exactly: typed fields and RoPE parameters.

Every problem raises :class:`ConversionError` naming the field; callers prefix the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ConversionError(ValueError):
    """A checkpoint or config this converter cannot translate exactly; the message says why."""


REQUIRED: Any = object()


def field(section: Mapping[str, Any], key: str, kind: type, default: Any = REQUIRED, where: str = "") -> Any:
    """``section[key]`` checked to be a ``kind`` (an int is a valid float; a bool is neither),
    or ``default`` when absent and one is given (``None`` is passed through)."""
    value = section.get(key, default)
    if value is REQUIRED:
        raise ConversionError(f"missing field {where}{key!r}")
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ConversionError(f"field {where}{key!r}: expected {kind.__name__}, got {value!r}")
    return value


def expect(hf: Mapping[str, Any], key: str, wanted: Any, why: str) -> None:
    """Refuse a field whose value (when present) Megatron would compute differently."""
    if key in hf and hf[key] is not None and hf[key] != wanted:
        raise ConversionError(f"{key}={hf[key]!r}: {why}")


def rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes ``rope_parameters``; older configs ``rope_scaling`` + ``rope_theta``.
    The result always has ``rope_theta`` and ``rope_type``."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ConversionError(f"field {key!r}: expected an object, got {params!r}")
    params = dict(params)
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def mlp_layer_types(hf: Mapping[str, Any], num_layers: int) -> list[str]:
    """``"dense"``/``"sparse"`` per layer: ``mlp_layer_types`` (A.X K1, transformers >= 5.24) or
    the legacy ``first_k_dense_replace`` (every later layer sparse; ``moe_layer_freq`` 1 only)."""
    if "mlp_layer_types" in hf:
        types = hf["mlp_layer_types"]
        if not isinstance(types, list) or len(types) != num_layers or set(types) - {"dense", "sparse"}:
            raise ConversionError(
                f"field 'mlp_layer_types': expected {num_layers} entries of 'dense'/'sparse', got {types!r}"
            )
        return types
    expect(hf, "moe_layer_freq", 1, "only every layer after first_k_dense_replace being MoE converts")
    first = field(hf, "first_k_dense_replace", int)
    return ["dense" if i < first else "sparse" for i in range(num_layers)]
