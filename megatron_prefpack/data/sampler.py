"""Feeding packed rows to Megatron: a map-style row dataset and a data-parallel batch sampler.

Training reads one endless *row stream*: epoch 0's row order, then epoch 1's, ... (each a
:meth:`PackingPlan.epoch_order`), so every row is read exactly once per epoch and nothing
is dropped at epoch ends. Global batch ``b`` is stream positions
``[b * global_batch_size, (b + 1) * global_batch_size)``; data-parallel rank ``r`` takes the
``r``-th contiguous slice of it and cuts that into micro-batches. Everything is a pure
function of the plan, so every rank can compute every global batch's counts (to normalise a
loss as a mean over the global batch) without communication, and resuming from a consumed
row count reproduces the same subsequent batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from megatron_prefpack.data.batch import RowBatch, collate
from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.layout import PackedRow
from megatron_prefpack.data.packing import PackingPlan, materialize_row


@dataclass(frozen=True)
class BatchCounts:
    """Totals of one global batch over all data-parallel ranks."""

    rows: int
    groups: int
    responses: int
    response_tokens: int


class PackedRowDataset:
    """Map-style dataset (torch ``Dataset`` protocol) over a plan's rows, in plan order.

    ``get_group(group_id)`` returns a ``TokenizedGroup`` (``GroupDataset.__getitem__`` does);
    rows are built on access. ``pad_to_multiple`` is passed to :func:`collate` by
    :meth:`collate` (dynamic padding for length-sorted unpacked rows; leave it None under
    pipeline parallelism, whose micro-batches must all have the configured length).
    """

    def __init__(
        self,
        plan: PackingPlan,
        get_group: Callable[[int], TokenizedGroup],
        pad_id: int,
        pad_to_multiple: int | None = None,
    ) -> None:
        self.plan = plan
        self.get_group = get_group
        self.pad_id = pad_id
        self.pad_to_multiple = pad_to_multiple

    def __len__(self) -> int:
        return self.plan.num_rows

    def __getitem__(self, row: int) -> PackedRow:
        return materialize_row(self.plan.rows[row], self.get_group, self.plan.row_length, self.pad_id)

    def collate(self, rows: list[PackedRow]) -> RowBatch:
        """``collate_fn`` for a torch ``DataLoader`` with a :class:`PackedRowSampler`."""
        return collate(rows, self.get_group, self.pad_to_multiple)

    def batch(self, rows: list[int]) -> RowBatch:
        """Materialise and collate the plan rows ``rows``."""
        return self.collate([self[r] for r in rows])


class PackedRowSampler:
    """Batch sampler yielding this data-parallel rank's micro-batches as lists of plan rows.

    ``global_batch_size`` (rows) must be a multiple of ``micro_batch_size * data_parallel_size``.
    Iteration starts after ``consumed_rows`` (a multiple of ``global_batch_size``) and stops
    before stream position ``total_rows`` (rounded down to whole global batches), or never
    when ``total_rows`` is None. For the ``unpacked`` layout every group must have the same
    number K of responses and ``micro_batch_size`` must be a multiple of K, so that the K
    rows of a group always share a micro-batch; length-sorted plans are shuffled in blocks
    of one micro-batch.
    """

    def __init__(
        self,
        plan: PackingPlan,
        micro_batch_size: int,
        global_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        consumed_rows: int = 0,
        total_rows: int | None = None,
    ) -> None:
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("micro_batch_size and data_parallel_size must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        per_step = micro_batch_size * data_parallel_size
        if global_batch_size < 1 or global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"micro_batch_size * data_parallel_size = {per_step}"
            )
        if consumed_rows < 0 or consumed_rows % global_batch_size:
            raise ValueError(
                f"consumed_rows {consumed_rows} must be a non-negative multiple of global_batch_size "
                f"{global_batch_size}"
            )
        if plan.num_rows == 0:
            raise ValueError("the packing plan has no rows")
        self.block_bins = 1
        if plan.config.layout == "unpacked":
            bin_rows = set(np.diff(plan.bin_offsets).tolist())
            if len(bin_rows) != 1:
                raise ValueError(
                    "the unpacked layout needs the same number of responses in every group, found "
                    f"{sorted(bin_rows)}"
                )
            (k,) = bin_rows
            if micro_batch_size % k:
                raise ValueError(
                    f"unpacked layout: micro_batch_size {micro_batch_size} must be a multiple of the "
                    f"{k} responses per group, so that a group's rows share a micro-batch"
                )
            if plan.config.sort_by_length:
                self.block_bins = micro_batch_size // k
        self.plan = plan
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_rows = consumed_rows
        self.total_rows = total_rows
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank per global batch."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.asarray(self.plan.epoch_order(epoch, self.block_bins), dtype=np.int64)
        return self._orders[epoch]

    def stream_rows(self, start: int, stop: int) -> list[int]:
        """Plan rows at row-stream positions ``[start, stop)``."""
        rows: list[int] = []
        n = self.plan.num_rows
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, n)
            take = min(stop - pos, n - offset)
            rows.extend(self._order(epoch)[offset : offset + take].tolist())
            pos += take
        return rows

    def global_batch_rows(self, global_batch: int) -> list[int]:
        """All plan rows of global batch ``global_batch`` (counted from the start of training)."""
        start = global_batch * self.global_batch_size
        return self.stream_rows(start, start + self.global_batch_size)

    def global_batch_counts(self, global_batch: int) -> BatchCounts:
        """Rows, groups, responses and loss tokens of a global batch over all DP ranks."""
        rows = np.asarray(self.global_batch_rows(global_batch), dtype=np.int64)
        plan = self.plan
        return BatchCounts(
            rows=len(rows),
            groups=int(plan.row_groups[rows].sum()),
            responses=int(plan.row_responses[rows].sum()),
            response_tokens=int(plan.row_response_tokens[rows].sum()),
        )

    def __len__(self) -> int:
        """Micro-batches this rank yields (needs ``total_rows``)."""
        if self.total_rows is None:
            raise TypeError("PackedRowSampler without total_rows is endless")
        remaining = self.total_rows // self.global_batch_size - self.consumed_rows // self.global_batch_size
        return max(0, remaining) * self.num_micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch_size // self.data_parallel_size
        first = self.consumed_rows // self.global_batch_size
        global_batches: Iterable[int] = (
            itertools.count(first)
            if self.total_rows is None
            else range(first, self.total_rows // self.global_batch_size)
        )
        for global_batch in global_batches:
            start = global_batch * self.global_batch_size + self.data_parallel_rank * per_rank
            mine = self.stream_rows(start, start + per_rank)
            for i in range(0, per_rank, self.micro_batch_size):
                yield mine[i : i + self.micro_batch_size]
