"""Packing plans: which groups (and which of their responses) go into which row.

The packer works from lengths only (:class:`GroupLengths`), so it handles millions of
groups without touching token arrays; rows are materialised lazily with
:func:`materialize_row`. Three layouts share the row format of :mod:`.layout`:

* ``prefpack``: a group's prompt is written once, followed by all of its responses;
  groups are packed into rows by first-fit-decreasing (FFD).
* ``duplicated``: the baseline that writes the prompt again for every response; all
  copies of a group are consecutive placements of the same row (one FFD item per group).
* ``unpacked``: one (prompt, response) per padded row; a group becomes ``K`` adjacent
  rows that form one *bin* and are never separated by the epoch shuffle.

A plan's *bins* are the units the per-epoch shuffle moves: one row for the packed
layouts, the ``K`` rows of one group for ``unpacked``. Every id in a plan is a
``TokenizedGroup.group_id``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.layout import PackedRow, build_row

Layout = Literal["prefpack", "duplicated", "unpacked"]
LAYOUTS: tuple[Layout, ...] = ("prefpack", "duplicated", "unpacked")

Placement = tuple[int, tuple[int, ...]]
"""``(group_id, response indices)``: one entry of a row, written as prompt + those responses."""


def row_length_multiple(
    tensor_parallel: int = 1, context_parallel: int = 1, sequence_parallel: bool = False
) -> int:
    """What the row length must be divisible by: TP under sequence parallelism (the sequence
    is split over TP ranks) and ``2 * CP`` under context parallelism (load-balanced halves)."""
    if tensor_parallel < 1 or context_parallel < 1:
        raise ValueError(f"parallel sizes must be >= 1, got TP={tensor_parallel} CP={context_parallel}")
    multiple = tensor_parallel if sequence_parallel else 1
    if context_parallel > 1:
        multiple = math.lcm(multiple, 2 * context_parallel)
    return multiple


def padded_row_length(
    seq_len: int, tensor_parallel: int = 1, context_parallel: int = 1, sequence_parallel: bool = False
) -> int:
    """``seq_len`` rounded up to :func:`row_length_multiple`."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    multiple = row_length_multiple(tensor_parallel, context_parallel, sequence_parallel)
    return -(-seq_len // multiple) * multiple


@dataclass(frozen=True)
class PackingConfig:
    """How to pack. ``seq_len`` is rounded up by :func:`padded_row_length` (see ``row_length``).

    ``sort_by_length`` (``unpacked`` only, the paper's "batch sorting") orders bins by length
    so that neighbouring rows have similar lengths; the epoch shuffle then moves blocks of
    neighbouring bins (see :meth:`PackingPlan.epoch_order`). ``skip_too_long`` drops groups
    that do not fit a row (counted in the plan) instead of raising.
    """

    seq_len: int
    layout: Layout = "prefpack"
    sort_by_length: bool = False
    seed: int = 1234
    tensor_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    skip_too_long: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.sort_by_length and self.layout != "unpacked":
            raise ValueError(
                f"sort_by_length applies to the 'unpacked' layout only ({self.layout!r} rows are packed full)"
            )

    @property
    def row_length(self) -> int:
        return padded_row_length(
            self.seq_len, self.tensor_parallel, self.context_parallel, self.sequence_parallel
        )


@dataclass(frozen=True)
class GroupLengths:
    """Token counts of G groups with N responses in all, in CSR form.

    ``prompt``: (G,) prompt lengths (>= 1); ``response``: (N,) response lengths (>= 1, EOS
    included); ``offsets``: (G+1,) so that group ``i`` has responses
    ``response[offsets[i]:offsets[i+1]]`` (at least one); ``group_ids``: (G,) the groups'
    ``TokenizedGroup.group_id``. All int64.
    """

    prompt: np.ndarray
    response: np.ndarray
    offsets: np.ndarray
    group_ids: np.ndarray

    def __post_init__(self) -> None:
        g = self.prompt.shape[0]
        if self.offsets.shape != (g + 1,) or self.group_ids.shape != (g,):
            raise ValueError("GroupLengths: offsets must be (G+1,) and group_ids (G,)")
        if self.offsets[0] != 0 or self.offsets[-1] != self.response.shape[0]:
            raise ValueError("GroupLengths: offsets must start at 0 and end at len(response)")
        bad_group = (self.num_responses < 1) | (self.prompt < 1)
        if bad_group.any():
            raise ValueError(
                f"group {int(self.group_ids[np.argmax(bad_group)])} has no response or an empty prompt"
            )
        if (self.response < 1).any():
            owner = np.searchsorted(self.offsets, np.argmax(self.response < 1), side="right") - 1
            raise ValueError(f"group {int(self.group_ids[owner])} has an empty response")

    @classmethod
    def from_arrays(
        cls,
        prompt: Sequence[int] | np.ndarray,
        responses: Sequence[Sequence[int]],
        group_ids: Sequence[int] | np.ndarray | None = None,
    ) -> GroupLengths:
        """From prompt lengths and per-group lists of response lengths; ids default to 0..G-1."""
        prompt_arr = np.asarray(prompt, dtype=np.int64)
        counts = np.array([len(r) for r in responses], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.fromiter((n for r in responses for n in r), dtype=np.int64, count=int(offsets[-1]))
        ids = np.arange(len(prompt_arr), dtype=np.int64) if group_ids is None else np.asarray(group_ids)
        return cls(prompt_arr, flat, offsets, ids.astype(np.int64))

    @classmethod
    def from_groups(cls, groups: Sequence[TokenizedGroup]) -> GroupLengths:
        return cls.from_arrays(
            [len(g.prompt) for g in groups],
            [[len(r) for r in g.responses] for g in groups],
            [g.group_id for g in groups],
        )

    def select(self, indices: np.ndarray) -> GroupLengths:
        """The groups at positions ``indices`` (in that order)."""
        counts = self.num_responses[indices]
        starts = np.repeat(self.offsets[indices], counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return GroupLengths(
            self.prompt[indices],
            self.response[starts + within],
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            self.group_ids[indices],
        )

    @property
    def num_groups(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def num_responses(self) -> np.ndarray:
        """(G,) responses per group."""
        return np.diff(self.offsets)

    @property
    def response_tokens(self) -> np.ndarray:
        """(G,) response tokens per group."""
        return _segment_sums(self.response, self.offsets)

    def group_tokens(self, layout: Layout) -> np.ndarray:
        """(G,) row tokens one group needs in ``layout`` (for ``unpacked``: its longest row)."""
        prefix = self.prompt - 1
        if layout == "prefpack":
            return prefix + self.num_responses + self.response_tokens
        if layout == "duplicated":
            return self.num_responses * self.prompt + self.response_tokens
        rows = np.repeat(self.prompt, self.num_responses) + self.response
        if not self.num_groups:
            return rows
        return np.maximum.reduceat(rows, self.offsets[:-1])

    def fits_every_layout(self, row_length: int) -> np.ndarray:
        """(G,) True where the group fits a row of ``row_length`` tokens in every layout: the
        groups on which layouts can be compared like for like (benchmarks)."""
        return np.logical_and.reduce([self.group_tokens(layout) <= row_length for layout in LAYOUTS])

    def attention_pairs(self, layout: Layout) -> np.ndarray:
        """(G,) attention (query, key) pairs one group's real tokens compute in ``layout``."""
        prefix = self.prompt - 1
        segments = segment_attention_pairs(self.response + 1, np.repeat(prefix, self.num_responses))
        copies = 1 if layout == "prefpack" else self.num_responses
        return copies * causal_attention_pairs(prefix) + _segment_sums(segments, self.offsets)


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums of ``values[offsets[i]:offsets[i+1]]`` for every i (int64)."""
    cumulative = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


IntOrArray = int | np.ndarray


def causal_attention_pairs(length: IntOrArray) -> IntOrArray:
    """(query, key) pairs of causal attention over ``length`` tokens: ``n(n+1)/2``."""
    return length * (length + 1) // 2


def segment_attention_pairs(length: IntOrArray, prefix_length: IntOrArray) -> IntOrArray:
    """Pairs of a segment of ``length`` tokens that sees a prefix of ``prefix_length`` tokens
    and itself causally: ``s*P + s(s+1)/2``."""
    return length * prefix_length + causal_attention_pairs(length)


def row_attention_pairs(row: PackedRow) -> int:
    """Number of True entries of ``layout.dense_mask`` for ``row`` (the causal-attention FLOP
    proxy): the pairs of every placement plus one self-pair per pad token."""
    total = row.length - sum(g.end - g.prefix_start for g in row.groups)
    for group in row.groups:
        total += causal_attention_pairs(group.prefix_length)
        total += sum(segment_attention_pairs(s.length, group.prefix_length) for s in group.segments)
    return int(total)


@dataclass(frozen=True)
class PackingStats:
    """Totals of a plan. ``padding_fraction`` = pad tokens / (rows * row_length);
    ``attention_pairs`` counts real tokens only (pads add one self-pair each)."""

    layout: Layout
    row_length: int
    rows: int
    groups: int
    responses: int
    real_tokens: int
    attention_pairs: int
    skipped: int

    @property
    def row_tokens(self) -> int:
        return self.rows * self.row_length

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.row_tokens if self.rows else 0.0


@dataclass
class PackingPlan:
    """The rows of one packed dataset, in plan order, plus per-row counts.

    ``rows[r]``: the placements of row ``r`` in row order. ``bin_offsets`` (num_bins+1,):
    bin ``b`` is rows ``bin_offsets[b]:bin_offsets[b+1]``. Per-row (num_rows,) int64:
    ``row_tokens`` (real tokens), ``row_groups`` (groups whose first placement is in the
    row, so sums over whole bins count each group once), ``row_responses``,
    ``row_response_tokens`` (loss-carrying tokens). ``skipped_group_ids``: groups that did
    not fit a row (``skip_too_long``).
    """

    config: PackingConfig
    rows: list[tuple[Placement, ...]]
    bin_offsets: np.ndarray
    row_tokens: np.ndarray
    row_groups: np.ndarray
    row_responses: np.ndarray
    row_response_tokens: np.ndarray
    attention_pairs: int
    skipped_group_ids: tuple[int, ...]

    @property
    def row_length(self) -> int:
        return self.config.row_length

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_bins(self) -> int:
        return int(self.bin_offsets.shape[0]) - 1

    @property
    def stats(self) -> PackingStats:
        return PackingStats(
            layout=self.config.layout,
            row_length=self.row_length,
            rows=self.num_rows,
            groups=int(self.row_groups.sum()),
            responses=int(self.row_responses.sum()),
            real_tokens=int(self.row_tokens.sum()),
            attention_pairs=self.attention_pairs,
            skipped=len(self.skipped_group_ids),
        )

    def epoch_order(self, epoch: int, block_bins: int = 1) -> list[int]:
        """Row order for ``epoch``: a permutation of all rows, deterministic for the seed and
        epoch. Bins stay whole; with ``block_bins > 1`` runs of ``block_bins`` neighbouring
        bins (in plan order) move together, which keeps length-sorted unpacked rows of a
        micro-batch alike (the last block may be shorter)."""
        if block_bins < 1:
            raise ValueError(f"block_bins must be >= 1, got {block_bins}")
        rng = np.random.default_rng([self.config.seed, epoch])
        block_starts = np.arange(0, self.num_bins, block_bins)
        order: list[int] = []
        for block in rng.permutation(len(block_starts)):
            first_bin = block_starts[block]
            last_bin = min(first_bin + block_bins, self.num_bins)
            order.extend(range(int(self.bin_offsets[first_bin]), int(self.bin_offsets[last_bin])))
        return order


def _too_long(lengths: GroupLengths, need: np.ndarray, config: PackingConfig) -> np.ndarray:
    """Boolean (G,) of groups whose ``need`` exceeds the row; raises unless ``skip_too_long``."""
    too_long = need > config.row_length
    if too_long.any() and not config.skip_too_long:
        i = int(np.argmax(too_long))
        raise ValueError(
            f"group {int(lengths.group_ids[i])} needs {int(need[i])} tokens in the {config.layout!r} "
            f"layout, more than the row length {config.row_length} ({int(too_long.sum())} groups too "
            "long; truncate them in preprocessing or set skip_too_long)"
        )
    return too_long


def _sorted_decreasing(sizes: np.ndarray, seed: int) -> np.ndarray:
    """Indices ordering ``sizes`` decreasingly; ties broken by a permutation drawn from ``seed``."""
    perm = np.random.default_rng(seed).permutation(sizes.shape[0])
    return perm[np.argsort(-sizes[perm], kind="stable")]


def first_fit_decreasing(sizes: np.ndarray, capacity: int, seed: int) -> list[list[int]]:
    """Pack items of ``sizes`` (each <= ``capacity``) into bins, largest first, each into the
    first bin with room. Returns per-bin item indices. O(n log n): a max-tree over the bins'
    free space finds the leftmost bin with room."""
    order = _sorted_decreasing(sizes, seed)
    leaves = 1
    while leaves < max(len(order), 1):
        leaves *= 2
    free = [capacity] * (2 * leaves)  # unopened bins are empty, so all start at capacity
    bins: list[list[int]] = []
    for item in order.tolist():
        size = int(sizes[item])
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= size else 2 * node + 1
        b = node - leaves
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        free[node] -= size
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


@dataclass
class _Rows:
    """Rows of a plan with their per-row counts (see :class:`PackingPlan`)."""

    rows: list[tuple[Placement, ...]]
    bin_offsets: np.ndarray
    tokens: np.ndarray
    groups: np.ndarray
    responses: np.ndarray
    response_tokens: np.ndarray


def _unpacked_rows(lengths: GroupLengths) -> _Rows:
    """One row per response, groups in the order of ``lengths``; a group's rows form a bin."""
    counts = lengths.num_responses
    within = np.arange(int(counts.sum())) - np.repeat(lengths.offsets[:-1], counts)
    gids = np.repeat(lengths.group_ids, counts)
    rows = [((gid, (k,)),) for gid, k in zip(gids.tolist(), within.tolist(), strict=True)]
    return _Rows(
        rows=rows,
        bin_offsets=lengths.offsets,
        tokens=np.repeat(lengths.prompt, counts) + lengths.response,
        groups=(within == 0).astype(np.int64),
        responses=np.ones(len(rows), dtype=np.int64),
        response_tokens=lengths.response.copy(),
    )


def _packed_rows(lengths: GroupLengths, need: np.ndarray, config: PackingConfig) -> _Rows:
    """FFD rows of whole groups; ``duplicated`` writes one placement per response."""
    num_responses = lengths.num_responses
    response_tokens = lengths.response_tokens
    bins = first_fit_decreasing(need, config.row_length, config.seed)
    rows: list[tuple[Placement, ...]] = []
    for members in bins:
        placements: list[Placement] = []
        for i in members:
            gid, k = int(lengths.group_ids[i]), int(num_responses[i])
            if config.layout == "prefpack":
                placements.append((gid, tuple(range(k))))
            else:
                placements.extend((gid, (j,)) for j in range(k))
        rows.append(tuple(placements))

    def per_row(values: np.ndarray) -> np.ndarray:
        return np.array([int(values[m].sum()) for m in bins], dtype=np.int64)

    return _Rows(
        rows=rows,
        bin_offsets=np.arange(len(rows) + 1, dtype=np.int64),
        tokens=per_row(need),
        groups=np.array([len(m) for m in bins], dtype=np.int64),
        responses=per_row(num_responses),
        response_tokens=per_row(response_tokens),
    )


def pack(lengths: GroupLengths, config: PackingConfig) -> PackingPlan:
    """Plan the rows of ``lengths`` for ``config`` (deterministic for ``config.seed``)."""
    need = lengths.group_tokens(config.layout)
    too_long = _too_long(lengths, need, config)
    keep = np.flatnonzero(~too_long)
    if config.sort_by_length:
        keep = keep[_sorted_decreasing(need[keep], config.seed)]
    kept = lengths.select(keep)
    rows = _unpacked_rows(kept) if config.layout == "unpacked" else _packed_rows(kept, need[keep], config)
    return PackingPlan(
        config=config,
        rows=rows.rows,
        bin_offsets=rows.bin_offsets,
        row_tokens=rows.tokens,
        row_groups=rows.groups,
        row_responses=rows.responses,
        row_response_tokens=rows.response_tokens,
        attention_pairs=int(kept.attention_pairs(config.layout).sum()),
        skipped_group_ids=tuple(int(g) for g in lengths.group_ids[too_long]),
    )


def materialize_row(
    placements: Sequence[Placement],
    get_group: Callable[[int], TokenizedGroup],
    row_length: int,
    pad_id: int,
) -> PackedRow:
    """Build the token row of one plan row. ``get_group(group_id)`` must return the group with
    that ``group_id`` (checked)."""
    entries = []
    for gid, response_indices in placements:
        group = get_group(gid)
        if group.group_id != gid:
            raise ValueError(f"get_group({gid}) returned group {group.group_id}")
        entries.append((gid, group.prompt, [(k, group.responses[k]) for k in response_indices]))
    return build_row(entries, row_length, pad_id)
