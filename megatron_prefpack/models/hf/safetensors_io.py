"""Hugging Face safetensors checkpoints: lazy tensor reads and sharded writes.

* :class:`SafetensorsCheckpoint` reads one tensor at a time from a directory's shards, with
  DeepSeek's block-scaled FP8 weights (``weight_scale_inv``, 128 x 128 blocks) dequantized, and
  experts fused by transformers >= 5 (``mlp.experts.gate_up_proj`` / ``down_proj``, 3-D) read
  through their per-expert names (``mlp.experts.{e}.gate_proj.weight``, the released layout);
* :class:`ShardWriter` writes tensors into shard files of bounded size, so an exporting process
  holds at most one shard's converted tensors beyond its model slice.

Every problem with the files (missing, unreadable, truncated or corrupt, inconsistent with each
other) raises :class:`ConversionError` whose message starts with the file.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_prefpack.data.json_files import read_json
from megatron_prefpack.models.hf.fields import ConversionError

FP8_BLOCK = 128
"""DeepSeek's FP8 weights carry one inverse scale per 128 x 128 block."""

INDEX_FILE = "model.safetensors.index.json"

_PER_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r"(.+\.experts)\.(gate_up_proj|down_proj)")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """``weight`` ``(out, in)`` in an FP8 dtype times its per-block inverse scales
    ``(ceil(out / block), ceil(in / block))``, as float32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return weight.float() * scale


def fused_expert_tensor(name: str) -> bool:
    """Whether ``name`` is a transformers-5 fused expert tensor (all experts of a layer)."""
    return _FUSED.fullmatch(name) is not None


@contextlib.contextmanager
def _shard(path: Path) -> Iterator[Any]:
    """``safe_open(path)``; a missing, unreadable, truncated or corrupt file (also when only a
    tensor read finds it so) raises :class:`ConversionError` ``"<path>: reason"``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except FileNotFoundError as err:
        raise ConversionError(f"{path}: no such file") from err
    except (SafetensorError, OSError) as err:
        raise ConversionError(f"{path}: unreadable safetensors file ({err})") from err


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of ``model.safetensors.index.json``."""
    content = read_json(index, ConversionError)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ConversionError(f"{index}: needs a 'weight_map' object of tensor name -> file name")
    return weight_map


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint directory, read one at a time.

    ``read(name)`` returns float32, FP8 weights dequantized with their ``<name>_scale_inv``;
    per-expert names also read fused expert tensors. ``used`` collects the stored names read
    (for the caller's "not used" report).

    Construction reads every shard's header (not its tensors) and checks that each tensor of
    ``model.safetensors.index.json`` is in the shard the index names, so a missing, truncated
    or corrupt shard or a wrong index fails here, on every rank alike, before any work."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self.files = _read_index(index)
            self.source = str(index)
            self._check_shards()
        else:
            self.files = self._scan()
            self.source = f"{self.directory}/*.safetensors"
        self.used: set[str] = set()

    def _scan(self) -> dict[str, str]:
        """Tensor name -> file name over every ``*.safetensors`` file of the directory."""
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.directory}: no *.safetensors files (and no {INDEX_FILE})")
        weight_map: dict[str, str] = {}
        for file in files:
            with _shard(file) as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
        return weight_map

    def _check_shards(self) -> None:
        """Every shard the index names opens, and holds the tensors the index places in it."""
        expected: dict[str, set[str]] = {}
        for name, file in self.files.items():
            expected.setdefault(file, set()).add(name)
        for file, names in sorted(expected.items()):
            with _shard(self.directory / file) as f:
                missing = names.difference(f.keys())
            if missing:
                raise ConversionError(
                    f"{self.directory / file}: has no tensor {min(missing)!r}, which {INDEX_FILE} "
                    f"places there ({len(missing)} such tensors)"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.files or self._fused(name) is not None

    def _fused(self, name: str) -> tuple[str, int, slice | None] | None:
        """``(fused tensor, expert, rows)`` holding per-expert ``name``, when stored fused."""
        match = _PER_EXPERT.fullmatch(name)
        if match is None or name in self.files:
            return None
        fused = f"{match[1]}.{'down_proj' if match[3] == 'down_proj' else 'gate_up_proj'}"
        if fused not in self.files:
            return None
        if match[3] == "down_proj":
            return fused, int(match[2]), None
        return fused, int(match[2]), slice(0, 1) if match[3] == "gate_proj" else slice(1, 2)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as float32 (also a per-expert name of fused experts)."""
        if (fused := self._fused(name)) is not None:
            stored, expert, half = fused
            tensor = self._read_stored(stored, expert)
            return tensor if half is None else tensor.chunk(2)[half.start]
        return self._read_stored(name)

    def _read_stored(self, name: str, index: int | None = None) -> torch.Tensor:
        if name not in self.files:
            raise ConversionError(f"{self.source}: no entry for tensor {name!r}")
        self.used.add(name)
        path = self.directory / self.files[name]
        with _shard(path) as f:
            if index is None:
                tensor = f.get_tensor(name)
            else:
                tensor_slice = f.get_slice(name)
                if not 0 <= index < tensor_slice.get_shape()[0]:
                    raise ConversionError(
                        f"{path}: tensor {name!r} of shape {tensor_slice.get_shape()} has no entry {index}"
                    )
                tensor = tensor_slice[index]
        scale_name = f"{name}_scale_inv"
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale_name not in self.files:
                raise ConversionError(f"{self.source}: FP8 tensor {name!r} has no {scale_name!r}")
            return dequantize_fp8(tensor, self._read_stored(scale_name))
        return tensor.float()


class ShardWriter:
    """Writes named tensors into ``directory/<stem>-<k>.safetensors`` files of at most
    ``max_bytes`` each (a larger tensor gets a file of its own).

    ``add`` keeps a tensor until its shard is full; ``close`` writes the last shard and returns
    ``{file name: [tensor names]}`` of every file written; ``total_bytes`` counts the tensor
    bytes written, ``names`` every name added. Names must be unique."""

    def __init__(self, directory: Path, stem: str, max_bytes: int) -> None:
        self.directory, self.stem, self.max_bytes = directory, stem, max_bytes
        self.files: dict[str, list[str]] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self.total_bytes = 0
        self.names: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._bytes += size
        self.total_bytes += size
        self.names.append(name)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = f"{self.stem}-{len(self.files):05d}.safetensors"
        save_file(self._pending, self.directory / file, metadata={"format": "pt"})
        self.files[file] = list(self._pending)
        self._pending, self._bytes = {}, 0

    def close(self) -> dict[str, list[str]]:
        if self._pending:
            self._flush()
        return self.files
