"""On-disk dataset of tokenized groups: writer and memory-mapped reader.

A dataset is a directory holding

* ``groups.bin`` / ``groups.idx``: a Megatron-Core ``IndexedDataset`` in which group ``i``
  is document ``i`` made of the sequences ``[prompt, response_1, ..., response_K]``
  (token dtype ``uint16`` when the vocabulary fits, else ``int32``, as Megatron picks it);
* ``kinds.npy`` (uint8, one per group; index into :data:`KINDS`), ``margins.npy`` (float64,
  one per group, NaN = none), ``lines.npy`` (int64, one per group: the source line number),
  ``scores.npy`` (float64, one per *sequence*, aligned with ``groups.idx``; NaN for prompts
  and for responses without a score);
* ``dataset.json``: format version, counts, and what the producer adds (tokenizer
  description, options, summary).

The writer stages everything in a hidden directory and moves it into place only when
:meth:`GroupDatasetWriter.finalize` succeeds, so a failed run never leaves a half dataset.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from megatron_prefpack.data.groups import TokenizedGroup

FORMAT = "prefpack-groups/1"
KINDS = ("pair", "ranked", "multi")
PREFIX = "groups"
_SIDECARS = ("kinds.npy", "margins.npy", "lines.npy", "scores.npy")


def _indexed_dataset_module():
    # Importing megatron.core warns about optional GPU optimizer kernels; irrelevant to data files.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class GroupDatasetWriter:
    """Append groups in order; group ids are assigned by position (``group_id`` is ignored).

    Use as a context manager: leaving the block with an exception discards everything.
    """

    def __init__(self, directory: str | Path, vocab_size: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.directory))
        indexed = _indexed_dataset_module()
        self.token_dtype = indexed.DType.optimal_dtype(vocab_size)
        self._builder = indexed.IndexedDatasetBuilder(
            indexed.get_bin_path(str(self._staging / PREFIX)), dtype=self.token_dtype
        )
        self._kinds: list[int] = []
        self._margins: list[float] = []
        self._lines: list[int] = []
        self._scores: list[float] = []

    def __len__(self) -> int:
        return len(self._kinds)

    def add(self, group: TokenizedGroup, line: int) -> None:
        """Append ``group`` (read from source line ``line``) as the next document."""
        sequences = [group.prompt, *group.responses]
        self._builder.add_document(np.concatenate(sequences), [len(s) for s in sequences])
        self._kinds.append(KINDS.index(group.kind))
        self._margins.append(np.nan if group.margin is None else group.margin)
        self._lines.append(line)
        scores = group.scores if group.scores is not None else [np.nan] * len(group.responses)
        self._scores.extend([np.nan, *scores])

    def finalize(self, info: dict[str, Any]) -> None:
        """Write the index and sidecars, then move the dataset into place. ``info`` goes into
        ``dataset.json`` next to the format fields. Refuses an empty dataset."""
        if not self._kinds:
            raise ValueError("no groups to write")
        indexed = _indexed_dataset_module()
        self._builder.finalize(indexed.get_idx_path(str(self._staging / PREFIX)))
        np.save(self._staging / "kinds.npy", np.asarray(self._kinds, dtype=np.uint8))
        np.save(self._staging / "margins.npy", np.asarray(self._margins, dtype=np.float64))
        np.save(self._staging / "lines.npy", np.asarray(self._lines, dtype=np.int64))
        np.save(self._staging / "scores.npy", np.asarray(self._scores, dtype=np.float64))
        header = {
            "format": FORMAT,
            "num_groups": len(self._kinds),
            "num_sequences": len(self._scores),
            "token_dtype": np.dtype(self.token_dtype).name,
        }
        (self._staging / "dataset.json").write_text(json.dumps({**header, **info}, indent=2) + "\n")
        for name in (f"{PREFIX}.bin", f"{PREFIX}.idx", *_SIDECARS, "dataset.json"):
            (self._staging / name).replace(self.directory / name)
        self._staging.rmdir()

    def abort(self) -> None:
        self._builder.data_file.close()
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
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        info_path = self.directory / "dataset.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{self.directory}: not a preprocessed dataset (no dataset.json)")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        if self.info.get("format") != FORMAT:
            raise ValueError(f"{self.directory}: unsupported dataset format {self.info.get('format')!r}")
        self._indexed = _indexed_dataset_module().IndexedDataset(str(self.directory / PREFIX), mmap=True)
        self._documents = self._indexed.document_indices
        self._kinds = np.load(self.directory / "kinds.npy")
        self._margins = np.load(self.directory / "margins.npy")
        self._lines = np.load(self.directory / "lines.npy")
        self._scores = np.load(self.directory / "scores.npy")

    def __len__(self) -> int:
        return len(self._documents) - 1

    def __getitem__(self, index: int) -> TokenizedGroup:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"group {index} out of range for {n} groups")
        index = int(index) % n
        start, stop = int(self._documents[index]), int(self._documents[index + 1])
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
