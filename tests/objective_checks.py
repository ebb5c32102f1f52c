"""Checks shared by the loss tests: an objective's micro-batches add up to the whole batch, and
each response's log-prob sum read naively from full logits (the independent reference)."""

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


def naive_response_stats(
    logits: torch.Tensor, rows: Sequence[Any], groups: dict[int, Any]
) -> dict[tuple[int, int], tuple[float, float, int]]:
    """``(group id, response index) -> (log-prob sum, mean logit over its tokens and the
    vocabulary, tokens)``, read straight from full logits ``(B, L, V)`` at each segment of the
    packed ``rows`` (``layout.PackedRow``), in float64: no code under test is involved."""
    out = {}
    for r, row in enumerate(rows):
        logps = torch.log_softmax(logits[r].double(), dim=-1)
        for placement in row.groups:
            for seg in placement.segments:
                response = groups[placement.group_id].responses[seg.response_index]
                positions = range(seg.start, seg.start + len(response))
                logp = sum(float(logps[t, int(tok)]) for t, tok in zip(positions, response, strict=True))
                mean_logit = float(logits[r, seg.start : seg.start + len(response)].double().mean())
                out[(placement.group_id, seg.response_index)] = (logp, mean_logit, len(response))
    return out
