"""A check shared by the loss tests: an objective's micro-batches add up to the whole batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def assert_micro_batches_sum_to_whole(
    run: Callable[[list[int], torch.Tensor], Any],
    output: torch.Tensor,
    num_rows: int,
    splits: Sequence[Sequence[int]],
) -> tuple[Any, torch.Tensor]:
    """``run(row_ids, output_leaf)`` applies the objective to those rows of ``output`` (with
    the global count fixed by the caller). The loss, its gradient w.r.t. ``output`` and every
    metric summed over ``splits`` must equal one call on all rows. Returns the whole-batch
    result and its gradient w.r.t. ``output``."""
    whole_leaf = output.clone().requires_grad_(True)
    whole = run(list(range(num_rows)), whole_leaf)
    whole.loss.backward()
    split_leaf = output.clone().requires_grad_(True)
    parts = [run(list(ids), split_leaf) for ids in splits]
    sum(p.loss for p in parts).backward()
    torch.testing.assert_close(sum(p.loss.detach() for p in parts), whole.loss.detach())
    torch.testing.assert_close(split_leaf.grad, whole_leaf.grad)
    for name, value in whole.metrics.items():
        torch.testing.assert_close(sum(p.metrics[name] for p in parts), value)
    assert sum(p.count for p in parts) == whole.count
    return whole, whole_leaf.grad
