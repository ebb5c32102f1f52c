"""Collating packed rows into a RowBatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_prefpack.data.batch import collate
from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.layout import NO_RESPONSE, PAD_DOC
from megatron_prefpack.data.packing import GroupLengths, PackingConfig, materialize_row, pack

PAD = 0


def groups_fixture() -> dict[int, TokenizedGroup]:
    rng = np.random.default_rng(0)
    shapes = [(5, [3, 4]), (4, [2, 6]), (7, [5, 1, 3]), (3, [8, 2]), (6, [4, 4])]
    groups = {}
    for i, (p, rs) in enumerate(shapes):
        gid = 10 + i
        groups[gid] = TokenizedGroup(
            gid,
            rng.integers(1, 500, p).astype(np.int32),
            [rng.integers(1, 500, r).astype(np.int32) for r in rs],
            kind="ranked" if len(rs) == 3 else "pair",
            scores=None if gid == 11 else [float(10 * gid + k) for k in range(len(rs))],
            margin=None if gid == 12 else 0.5 * gid,
        )
    return groups


@pytest.mark.parametrize("layout", ["prefpack", "duplicated", "unpacked"])
def test_collate_shapes_dtypes_and_response_slots(layout):
    groups = groups_fixture()
    plan = pack(GroupLengths.from_groups(list(groups.values())), PackingConfig(32, layout))
    rows = [materialize_row(r, groups.__getitem__, plan.row_length, PAD) for r in plan.rows]
    batch = collate(rows, groups)

    b, length = len(rows), plan.row_length
    for name in ("tokens", "labels", "position_ids", "doc_ids", "segment_ids", "response_slots"):
        tensor = getattr(batch, name)
        assert tensor.shape == (b, length) and tensor.dtype == torch.int64, name
    assert batch.loss_mask.shape == (b, length) and batch.loss_mask.dtype == torch.bool
    n = sum(len(g.responses) for g in groups.values())
    assert batch.num_responses == n and batch.num_groups == len(groups)
    for name in ("response_group_ids", "response_indices", "response_num_tokens", "response_group_slots"):
        assert getattr(batch, name).shape == (n,) and getattr(batch, name).dtype == torch.int64
    assert batch.response_scores.dtype == torch.float32 and batch.group_margins.dtype == torch.float32
    assert len(batch.placements) == b

    assert ((batch.response_slots != NO_RESPONSE) == batch.loss_mask).all()
    assert ((batch.doc_ids == PAD_DOC) == (batch.segment_ids == PAD_DOC)).all()
    pairs = set()
    for s in range(n):
        gid, k = int(batch.response_group_ids[s]), int(batch.response_indices[s])
        pairs.add((gid, k))
        response = groups[gid].responses[k]
        # the labels of the slot's tokens are exactly the response
        assert batch.labels[batch.response_slots == s].tolist() == response.tolist()
        assert int(batch.response_num_tokens[s]) == len(response)
        assert int(batch.group_ids[batch.response_group_slots[s]]) == gid
        expected_score = math.nan if groups[gid].scores is None else groups[gid].scores[k]
        np.testing.assert_equal(float(batch.response_scores[s]), expected_score)
    assert pairs == {(g, k) for g, grp in groups.items() for k in range(len(grp.responses))}
    for gslot, gid in enumerate(batch.group_ids.tolist()):
        margin = groups[gid].margin
        np.testing.assert_equal(float(batch.group_margins[gslot]), math.nan if margin is None else margin)

    by_callable = collate(rows, groups.__getitem__)
    assert torch.equal(by_callable.response_slots, batch.response_slots)
    moved = batch.to("cpu")
    assert moved.placements is batch.placements and torch.equal(moved.tokens, batch.tokens)


def test_pad_to_multiple_cuts_to_longest_row():
    groups = groups_fixture()
    plan = pack(GroupLengths.from_groups(list(groups.values())), PackingConfig(64, "unpacked"))
    rows = [materialize_row(r, groups.__getitem__, plan.row_length, PAD) for r in plan.rows[:2]]
    longest = max(r.num_real_tokens for r in rows)
    batch = collate(rows, groups, pad_to_multiple=8)
    assert batch.tokens.shape == (2, -(-longest // 8) * 8)
    full = collate(rows, groups)
    assert torch.equal(batch.labels, full.labels[:, : batch.tokens.shape[1]])
    assert collate(rows, groups, pad_to_multiple=1000).tokens.shape == (2, 64)


def test_collate_rejects_mixed_lengths():
    groups = groups_fixture()
    a = materialize_row([(10, (0, 1))], groups.__getitem__, 32, PAD)
    b = materialize_row([(10, (0, 1))], groups.__getitem__, 40, PAD)
    with pytest.raises(ValueError, match="differ in length"):
        collate([a, b], groups)
