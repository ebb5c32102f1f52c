"""Reading checkpoint files without running code from them.

A pickle names importable callables and calls them while it loads: a pickle planted in a
checkpoint runs whatever it names in the process that loads it. These are the pickles a
load of ours reads, and what admits them:

- ``rank_state/rank*.pt`` (ours) and ``common.pt`` (Megatron 0.16's non-tensor state):
  ``torch.load(weights_only=True)``: tensors, primitive containers, dtypes; no callables;
- objects stored inside ``.distcp`` shards (Megatron's common state under 0.19, modules'
  ``_extra_state``): torch DCP loads them with ``weights_only=False``; inside
  :func:`restricted_reads` they are loaded ``weights_only=True`` like the above;
- ``.distcp`` tensors: torch DCP already loads them ``weights_only=True``;
- DCP's ``.metadata``: torch reads it with plain ``pickle.load`` on every load; inside
  :func:`restricted_reads` it goes through :func:`load_metadata`, an unpickler that admits
  only the records torch DCP writes there (:data:`METADATA_GLOBALS`) and torch dtypes.

The check is the load itself (nothing is scanned first and read again): the bytes that are
checked are the bytes that are used. A refused pickle raises :class:`RefusedPickle` naming the
file, and what it names is never imported or called.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem

_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS: dict[str, frozenset[str]] = {
    f"{_DCP}.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    f"{_DCP}.planner": frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"}),
    f"{_DCP}.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # a layout by its name, from a fixed table
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath"}),  # the checkpoint id torch's FileSystemWriter records
}
"""Every global a DCP ``.metadata`` pickle names (torch dtypes aside): the set found by
unpickling checkpoints written by megatron-core 0.16's and 0.19's writers and by ours
(dense and MoE models, plain and distributed optimizer, one and two ranks). All are plain
records, enums, ``torch.Size`` or a path: building them calls nothing but their constructors."""


class RefusedPickle(pickle.UnpicklingError):
    """A checkpoint file holds a pickled object that the format never stores; the message names
    the file and the object."""


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`METADATA_GLOBALS` and torch dtypes."""

    def __init__(self, file: IO[bytes], name: str) -> None:
        super().__init__(file)
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if name in METADATA_GLOBALS.get(module, ()) or _is_dtype(module, name):
            return super().find_class(module, name)
        raise RefusedPickle(
            f"{self._name}: refused to unpickle {module}.{name}: checkpoint metadata holds only "
            "torch.distributed.checkpoint records"
        )


def load_metadata(file: IO[bytes]) -> Any:
    """Unpickle a DCP ``.metadata`` stream; raises :class:`RefusedPickle` for anything else."""
    return _MetadataUnpickler(file, str(getattr(file, "name", "<metadata stream>"))).load()


def _weights_only_reason(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, without its advice to load unsafely."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(err))
    if refused:
        return f"refused to unpickle {refused.group(1)}: a checkpoint file holds only tensors and plain data"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"refused to unpickle it: {lines[-1] if lines else type(err).__name__}"


def load_weights_only(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a refused pickle raises
    :class:`RefusedPickle` naming ``path``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RefusedPickle(f"{path}: {_weights_only_reason(err)}") from None


@dataclass
class _Reads:
    """What the patched readers saw: the file DCP has open, and the first refusal."""

    current_file: str = "<checkpoint stream>"
    refusal: RefusedPickle | None = None

    def refuse(self, err: RefusedPickle) -> RefusedPickle:
        if self.refusal is None:
            self.refusal = err
        return err


def _pickle_shim(reads: _Reads) -> types.ModuleType:
    """``pickle`` as DCP's filesystem module sees it: ``load`` is :func:`load_metadata`."""

    def load(file: IO[bytes], *args: Any, **kwargs: Any) -> Any:
        try:
            return load_metadata(file)
        except RefusedPickle as err:
            raise reads.refuse(err) from None

    shim = types.ModuleType("pickle")
    shim.__dict__.update(pickle.__dict__)
    shim.load = load
    return shim


def _source(f: Any, reads: _Reads) -> str:
    """What a ``torch.load`` argument is, for a message: a path, or the file DCP has open."""
    if isinstance(f, str | os.PathLike):
        return str(f)
    if isinstance(f, io.BytesIO):
        return f"an object stored in {reads.current_file}"
    return str(getattr(f, "name", reads.current_file))


def _weights_only_torch_load(reads: _Reads, original: Callable[..., Any]) -> Callable[..., Any]:
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            refusal = RefusedPickle(f"{_source(f, reads)}: {_weights_only_reason(err)}")
            raise reads.refuse(refusal) from None

    return load


def _tracking_create_stream(reads: _Reads, original: Callable[..., Any]) -> Callable[..., Any]:
    @contextlib.contextmanager
    def create_stream(fs: Any, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        with original(fs, path, mode) as stream:
            reads.current_file = str(path)
            yield stream

    return create_stream


@contextlib.contextmanager
def restricted_reads() -> Iterator[None]:
    """For the block: DCP's ``.metadata`` through :func:`load_metadata`, and every
    ``torch.load`` ``weights_only=True`` (also where torch DCP asks for ``False``).

    Raises :class:`RefusedPickle` naming the file (and, for an object inside a ``.distcp``
    shard, that shard) when a read in the block refused a pickle, whatever exception the
    readers above turned it into (DCP wraps a rank's failure in its own exception). Patches
    process-wide names for the block: one thread, not nested (a checkpoint load is both)."""
    reads = _Reads()
    saved = (dcp_filesystem.pickle, torch.load, dcp_filesystem.FileSystem.create_stream)
    dcp_filesystem.pickle = _pickle_shim(reads)
    torch.load = _weights_only_torch_load(reads, saved[1])
    dcp_filesystem.FileSystem.create_stream = _tracking_create_stream(reads, saved[2])
    try:
        yield
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        if reads.refusal is not None:
            raise reads.refusal from err
        raise
    finally:
        dcp_filesystem.pickle, torch.load, dcp_filesystem.FileSystem.create_stream = saved
