"""On-disk dataset of tokenized groups: writer and memory-mapped reader.

A dataset is a directory holding

* ``groups.bin`` / ``groups.idx``: a Megatron-Core ``IndexedDataset`` in which group ``i``
  is document ``i`` made of the sequences ``[prompt, response_1, ..., response_K]``
  (token dtype ``uint16`` when the vocabulary fits, else ``int32``, as Megatron picks it);
* ``kinds.npy`` (uint8, one per group; index into :data:`KINDS`), ``margins.npy`` (float64,
  one per group, NaN = none), ``lines.npy`` (int64, one per group: the source line number),
  ``scores.npy`` (float64, one per *sequence*, aligned with ``groups.idx``; NaN for prompts
  and for responses without a score);
* ``dataset.json``: format version, counts, token dtype, the content ``fingerprint``
  (:func:`content_fingerprint`) and what the producer adds (tokenizer description, options,
  summary).

The writer stages everything in a hidden directory and moves it into place only when
:meth:`GroupDatasetWriter.finalize` succeeds, so a failed run never leaves a half dataset; an
``OSError`` while writing (a full disk) removes the staging directory and is raised as
:class:`DatasetWriteError` naming the output directory. Opening a dataset checks that its
files agree with each other (format, group and sequence counts, sizes, token dtype) and
raises :class:`DatasetError` naming the file and what disagrees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.json_files import read_json_object

FORMAT = "prefpack-groups/1"
KINDS = ("pair", "ranked", "multi")
PREFIX = "groups"
INFO = "dataset.json"
_SIDECAR_DTYPES: dict[str, type[np.generic]] = {
    "kinds.npy": np.uint8,
    "margins.npy": np.float64,
    "lines.npy": np.int64,
    "scores.npy": np.float64,
}
DATA_FILES = (f"{PREFIX}.idx", f"{PREFIX}.bin", *_SIDECAR_DTYPES)
"""The files :func:`content_fingerprint` covers, in its order."""
_INDEX_MAGIC = b"MMIDIDX\x00\x00"  # Megatron's .idx version 1: this magic, then version (uint64),
_INDEX_HEADER = struct.Struct("<9sQBQQ")  # token dtype code (uint8), sequence and document counts (uint64)
_HASH_BLOCK = 4 << 20


class DatasetError(ValueError):
    """A dataset directory that cannot be used as it is: a file missing, unreadable or
    disagreeing with another. The message starts with the file at fault."""


class DatasetWriteError(OSError):
    """Writing a dataset failed (e.g. the disk is full). The staging directory is gone; the
    message names the output directory and the reason."""


def _indexed_dataset_module():
    # Importing megatron.core warns about optional GPU optimizer kernels; irrelevant to data files.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def content_fingerprint(directory: str | Path) -> str:
    """SHA-256 (hex) over the files of :data:`DATA_FILES` in ``directory``, in that order, each
    preceded by its name and size, read in blocks. Equal fingerprints mean the same groups:
    tokens, kinds, scores, margins and source lines (``dataset.json`` is not covered)."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        path = Path(directory) / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


class GroupDatasetWriter:
    """Append groups in order; group ids are assigned by position (``group_id`` is ignored).

    Use as a context manager: leaving the block with an exception discards everything. Any
    ``OSError`` raised while writing becomes :class:`DatasetWriteError`.
    """

    def __init__(self, directory: str | Path, vocab_size: int) -> None:
        self.directory = Path(directory)
        self._staging: Path | None = None
        self._builder = None
        self._kinds: list[int] = []
        self._margins: list[float] = []
        self._lines: list[int] = []
        self._scores: list[float] = []
        indexed = _indexed_dataset_module()
        self.token_dtype = indexed.DType.optimal_dtype(vocab_size)
        with self._discard_on_os_error():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.directory))
            self._builder = indexed.IndexedDatasetBuilder(
                indexed.get_bin_path(str(self._staging / PREFIX)), dtype=self.token_dtype
            )

    def __len__(self) -> int:
        return len(self._kinds)

    def add(self, group: TokenizedGroup, line: int) -> None:
        """Append ``group`` (read from source line ``line``) as the next document."""
        sequences = [group.prompt, *group.responses]
        with self._discard_on_os_error():
            self._builder.add_document(np.concatenate(sequences), [len(s) for s in sequences])
        self._kinds.append(KINDS.index(group.kind))
        self._margins.append(np.nan if group.margin is None else group.margin)
        self._lines.append(line)
        scores = group.scores if group.scores is not None else [np.nan] * len(group.responses)
        self._scores.extend([np.nan, *scores])

    def finalize(self, info: dict[str, Any]) -> None:
        """Write the index, sidecars and ``dataset.json`` (``info`` next to the format fields and
        the fingerprint), then move the dataset into place. Refuses an empty dataset."""
        if not self._kinds:
            raise ValueError("no groups to write")
        with self._discard_on_os_error():
            self._write_staged(info)
            self._move_into_place()

    def _write_staged(self, info: dict[str, Any]) -> None:
        self._builder.finalize(_indexed_dataset_module().get_idx_path(str(self._staging / PREFIX)))
        values = {
            "kinds.npy": self._kinds,
            "margins.npy": self._margins,
            "lines.npy": self._lines,
            "scores.npy": self._scores,
        }
        for name, dtype in _SIDECAR_DTYPES.items():
            np.save(self._staging / name, np.asarray(values[name], dtype=dtype))
        header = {
            "format": FORMAT,
            "num_groups": len(self._kinds),
            "num_sequences": len(self._scores),
            "token_dtype": np.dtype(self.token_dtype).name,
            "fingerprint": content_fingerprint(self._staging),
        }
        (self._staging / INFO).write_text(json.dumps({**header, **info}, indent=2) + "\n")

    def _move_into_place(self) -> None:
        # A directory without dataset.json is no dataset: dropping an old one first means a crash
        # between the moves cannot leave it describing a mix of old and new files.
        (self.directory / INFO).unlink(missing_ok=True)
        for name in (*DATA_FILES, INFO):
            (self._staging / name).replace(self.directory / name)
        self._staging.rmdir()

    @contextlib.contextmanager
    def _discard_on_os_error(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            self.abort()
            raise DatasetWriteError(f"{self.directory}: cannot write the dataset: {e.strerror or e}") from e

    def abort(self) -> None:
        """Discard everything staged. Never raises: on a full disk closing the token file fails too."""
        if self._builder is not None:
            with contextlib.suppress(OSError):
                self._builder.data_file.close()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> GroupDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass(frozen=True)
class GroupTokenLengths:
    """Token counts of every group, as flat arrays (int64), for packers and samplers
    (``megatron_prefpack.data.packing.GroupLengths`` is built from these).

    ``prompt[g]`` is P of group ``g``; the response lengths of group ``g`` (EOS included)
    are ``response[response_offsets[g]:response_offsets[g + 1]]``.
    """

    prompt: np.ndarray
    response: np.ndarray
    response_offsets: np.ndarray

    @property
    def num_responses(self) -> np.ndarray:
        return np.diff(self.response_offsets)

    @property
    def packed(self) -> np.ndarray:
        """Tokens each group occupies in the preference-packed layout (``TokenizedGroup.num_tokens``)."""
        return self.prompt - 1 + self.num_responses + self._response_sums

    @cached_property
    def _response_sums(self) -> np.ndarray:
        return np.add.reduceat(self.response, self.response_offsets[:-1])


class GroupDataset:
    """Random access to a preprocessed dataset: ``dataset[i]`` is a :class:`TokenizedGroup`
    with ``group_id == i`` and int32 token arrays (copies; the files stay memory-mapped).
    ``meta["line"]`` is the source line. Picklable (reopens the files), for DataLoader workers.

    Opening raises :class:`DatasetError` naming the file when one is missing, unreadable or
    disagrees with the others (see :func:`_check_index` and :func:`_check_counts`); tokens are
    not read, so opening costs little even for a large dataset.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.info: dict[str, Any] = _read_info(self.directory / INFO)
        self._indexed = _open_index(self.directory)
        _check_index(self.directory, self._indexed.index, self.info)
        sidecars = {
            name: _load_sidecar(self.directory / name, dtype) for name, dtype in _SIDECAR_DTYPES.items()
        }
        _check_counts(self.directory, self.info, self._indexed.index, sidecars)
        self._documents = self._indexed.document_indices
        self._kinds, self._margins, self._lines, self._scores = sidecars.values()

    def __len__(self) -> int:
        return len(self._documents) - 1

    def __getitem__(self, index: int) -> TokenizedGroup:
        index, start, stop = self._bounds(index)
        prompt, *responses = (s.astype(np.int32) for s in self._indexed[start:stop])
        kind = KINDS[self._kinds[index]]
        margin = float(self._margins[index])
        return TokenizedGroup(
            group_id=index,
            prompt=prompt,
            responses=responses,
            kind=kind,
            scores=None if kind == "multi" else [float(s) for s in self._scores[start + 1 : stop]],
            margin=None if np.isnan(margin) else margin,
            meta={"line": int(self._lines[index])},
        )

    def _bounds(self, index: int) -> tuple[int, int, int]:
        """``(group id, first sequence, end sequence)`` of group ``index`` (negative counts from the end)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"group {index} out of range for {n} groups")
        index = int(index) % n
        return index, int(self._documents[index]), int(self._documents[index + 1])

    @property
    def kinds(self) -> np.ndarray:
        """The kind of every group, shape (G,), uint8, read-only: an index into :data:`KINDS`."""
        return self._kinds

    def response_scores(self, group_id: int) -> np.ndarray:
        """The scores of group ``group_id``'s responses in order, shape (K,), float64, read-only;
        NaN = no score (every response of a ``multi`` group). Pairs hold ``[1.0, 0.0]``
        (chosen, rejected); ``ranked`` groups the record's scores, higher = better."""
        _, start, stop = self._bounds(group_id)
        return self._scores[start + 1 : stop]

    @cached_property
    def fingerprint(self) -> str:
        """The content fingerprint recorded in ``dataset.json`` (:func:`content_fingerprint`);
        computed from the files for datasets written before it was recorded."""
        return self.info.get("fingerprint") or content_fingerprint(self.directory)

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size of the tokenizer that made the dataset (``None`` if not recorded)."""
        return self.info.get("tokenizer", {}).get("vocab_size")

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id (0 if not recorded); pad tokens carry no loss or attention."""
        return self.info.get("tokenizer", {}).get("pad_id", 0)

    def token_lengths(self) -> GroupTokenLengths:
        """All token lengths, from the index alone (no token is read); computed once."""
        return self._lengths

    @cached_property
    def _lengths(self) -> GroupTokenLengths:
        sequence_lengths = self._indexed.sequence_lengths.astype(np.int64)
        documents = self._documents.astype(np.int64)
        is_prompt = np.zeros(len(sequence_lengths), dtype=bool)
        is_prompt[documents[:-1]] = True
        return GroupTokenLengths(
            prompt=sequence_lengths[is_prompt],
            response=sequence_lengths[~is_prompt],
            response_offsets=documents - np.arange(len(documents)),
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": str(self.directory)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])


# --- checks on opening -----------------------------------------------------------------


def _read_info(path: Path) -> dict[str, Any]:
    """``dataset.json``, parsed, with its format and the fields this module reads checked."""
    if not path.is_file():
        raise DatasetError(f"{path.parent}: not a preprocessed dataset (no {INFO})")
    info = read_json_object(path, DatasetError)
    if info.get("format") != FORMAT:
        raise DatasetError(
            f"{path}: field 'format': unsupported dataset format {info.get('format')!r} (expected {FORMAT!r})"
        )
    _check_info_fields(path, info)
    return info


def _check_info_fields(path: Path, info: dict[str, Any]) -> None:
    def bad(key: str, expected: str, value: Any) -> DatasetError:
        return DatasetError(f"{path}: field '{key}': expected {expected}, got {value!r}")

    for key in ("num_groups", "num_sequences"):
        if not _is_count(info.get(key)):
            raise bad(key, "a non-negative integer", info.get(key))
    if not isinstance(info.get("token_dtype"), str):
        raise bad("token_dtype", "a dtype name", info.get("token_dtype"))
    fingerprint = info.get("fingerprint")
    if fingerprint is not None and not _is_sha256(fingerprint):
        raise bad("fingerprint", "64 lowercase hex digits (SHA-256)", fingerprint)
    tokenizer = info.get("tokenizer", {})
    if not isinstance(tokenizer, dict):
        raise bad("tokenizer", "an object", tokenizer)
    for key in ("vocab_size", "pad_id"):
        if key in tokenizer and not _is_count(tokenizer[key]):
            raise bad(f"tokenizer.{key}", "a non-negative integer", tokenizer[key])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _open_index(directory: Path):
    """Megatron's memory-mapped ``IndexedDataset`` over ``groups.idx``/``groups.bin``, after
    checking the index header and size so that Megatron's reader (whose asserts name no cause
    and whose cleanup fails on a half-built object) only sees a well-formed file."""
    idx, bin_path = directory / f"{PREFIX}.idx", directory / f"{PREFIX}.bin"
    for path in (idx, bin_path):
        if not path.is_file():
            raise DatasetError(f"{path}: missing")
    if bin_path.stat().st_size == 0:
        raise DatasetError(f"{bin_path}: empty")
    _check_index_header(idx)
    try:
        return _indexed_dataset_module().IndexedDataset(str(directory / PREFIX), mmap=True)
    except (AssertionError, struct.error, ValueError, KeyError, IndexError, OSError) as e:
        cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise DatasetError(f"{idx}: not a readable Megatron index ({cause})") from None


def _check_index_header(idx: Path) -> None:
    """Magic, version, token dtype code, and a file size that matches the header's counts."""
    with open(idx, "rb") as f:
        header = f.read(_INDEX_HEADER.size)
    if len(header) < _INDEX_HEADER.size:
        raise DatasetError(f"{idx}: not a Megatron index ({len(header)} bytes, shorter than its header)")
    magic, version, code, sequences, documents = _INDEX_HEADER.unpack(header)
    if magic != _INDEX_MAGIC:
        raise DatasetError(f"{idx}: not a Megatron index (starts with {magic!r}, expected {_INDEX_MAGIC!r})")
    if version != 1:
        raise DatasetError(f"{idx}: Megatron index version {version}, expected 1")
    if code not in {d.value for d in _indexed_dataset_module().DType}:
        raise DatasetError(f"{idx}: unknown token dtype code {code}")
    expected = (
        _INDEX_HEADER.size + 12 * sequences + 8 * documents
    )  # int32 lengths, int64 pointers and documents
    if idx.stat().st_size != expected:
        raise DatasetError(
            f"{idx}: {idx.stat().st_size} bytes, but its header's counts ({sequences} sequences, "
            f"{documents} document indices) need {expected}"
        )


def _check_index(directory: Path, index, info: dict[str, Any]) -> None:
    """The index agrees with itself, with ``groups.bin`` and with ``dataset.json``'s token dtype:
    documents that are groups (a prompt and at least one response), positive sequence lengths,
    pointers that follow the lengths, the exact ``.bin`` size."""
    idx, bin_path = directory / f"{PREFIX}.idx", directory / f"{PREFIX}.bin"
    sequences, documents = index.sequence_count, index.document_count
    starts = index.document_indices
    if documents < 2 or starts[0] != 0 or starts[-1] != sequences or (np.diff(starts) < 2).any():
        raise DatasetError(
            f"{idx}: document indices do not split its {sequences} sequences into groups of a prompt "
            "and at least one response"
        )
    lengths = index.sequence_lengths.astype(np.int64)
    if (lengths < 1).any():
        first = int(np.argmax(lengths < 1))
        raise DatasetError(f"{idx}: sequence {first} has length {lengths[first]}")
    itemsize = np.dtype(index.dtype).itemsize
    if not np.array_equal(index.sequence_pointers, (np.cumsum(lengths) - lengths) * itemsize):
        raise DatasetError(f"{idx}: sequence pointers do not follow the sequence lengths")
    tokens = int(lengths.sum())
    if bin_path.stat().st_size != tokens * itemsize:
        raise DatasetError(
            f"{bin_path}: {bin_path.stat().st_size} bytes, but {idx.name} describes {tokens} tokens "
            f"of {np.dtype(index.dtype).name} ({tokens * itemsize} bytes)"
        )
    if np.dtype(index.dtype).name != info["token_dtype"]:
        raise DatasetError(
            f"{directory / INFO}: field 'token_dtype' is {info['token_dtype']!r}, but {idx.name} "
            f"holds {np.dtype(index.dtype).name} tokens"
        )


def _load_sidecar(path: Path, dtype: type[np.generic]) -> np.ndarray:
    """A 1-D ``.npy`` array of ``dtype``, read-only; never unpickles."""
    try:
        with open(path, "rb") as f:
            array = np.lib.format.read_array(f, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npy array ({e})") from None
    if array.ndim != 1 or array.dtype != dtype:
        raise DatasetError(
            f"{path}: expected a 1-D {np.dtype(dtype).name} array, got {array.ndim}-D {array.dtype}"
        )
    array.flags.writeable = False
    return array


def _check_counts(directory: Path, info: dict[str, Any], index, sidecars: dict[str, np.ndarray]) -> None:
    """``dataset.json`` and every sidecar count the groups (documents) and sequences of the index."""
    idx_name = f"{PREFIX}.idx"
    groups, sequences = index.document_count - 1, index.sequence_count
    for key, count, what in (("num_groups", groups, "groups"), ("num_sequences", sequences, "sequences")):
        if info[key] != count:
            raise DatasetError(
                f"{directory / INFO}: field '{key}' is {info[key]}, but {idx_name} holds {count} {what}"
            )
    for name, array in sidecars.items():
        count, what = (sequences, "sequences") if name == "scores.npy" else (groups, "groups")
        if len(array) != count:
            raise DatasetError(
                f"{directory / name}: {len(array)} entries, but {idx_name} holds {count} {what}"
            )
    kinds = sidecars["kinds.npy"]
    if (kinds >= len(KINDS)).any():
        first = int(np.argmax(kinds >= len(KINDS)))
        raise DatasetError(
            f"{directory / 'kinds.npy'}: group {first} has kind {kinds[first]}, not one of "
            f"0..{len(KINDS) - 1} ({', '.join(KINDS)})"
        )
