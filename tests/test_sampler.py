"""The data-parallel row sampler and the row dataset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.packing import GroupLengths, PackingConfig, PackingPlan, pack
from megatron_prefpack.data.sampler import PackedRowDataset, PackedRowSampler


def plan_for(layout: str, num_groups: int = 60, sort: bool = False, k: int = 2) -> PackingPlan:
    rng = np.random.default_rng(3)
    lengths = GroupLengths.from_arrays(
        rng.integers(1, 30, num_groups), rng.integers(1, 20, (num_groups, k)).tolist()
    )
    return pack(lengths, PackingConfig(128, layout, sort_by_length=sort))


def ranks(plan: PackingPlan, mbs: int, gbs: int, dp: int, **kwargs) -> list[PackedRowSampler]:
    return [PackedRowSampler(plan, mbs, gbs, r, dp, **kwargs) for r in range(dp)]


@pytest.mark.parametrize("layout", ["prefpack", "duplicated", "unpacked"])
def test_dp_ranks_cover_each_row_once_per_epoch(layout):
    plan = plan_for(layout)
    mbs, dp = 2, 3
    gbs = mbs * dp * 2
    samplers = ranks(plan, mbs, gbs, dp)
    epochs = 3
    num_global = epochs * plan.num_rows // gbs + 1
    per_rank = [list(itertools.islice(iter(s), num_global * 2)) for s in samplers]
    stream: list[int] = []
    for g in range(num_global):
        global_rows = []
        for r in range(dp):
            micro = per_rank[r][2 * g : 2 * g + 2]
            assert all(len(m) == mbs for m in micro)
            global_rows.extend(itertools.chain(*micro))
        assert global_rows == samplers[0].global_batch_rows(g)
        stream.extend(global_rows)
    for e in range(epochs):
        epoch_rows = stream[e * plan.num_rows : (e + 1) * plan.num_rows]
        assert sorted(epoch_rows) == list(range(plan.num_rows))
        assert epoch_rows == plan.epoch_order(e)


@pytest.mark.parametrize("layout", ["prefpack", "unpacked"])
def test_resume_from_consumed_rows(layout):
    plan = plan_for(layout)
    mbs, dp, gbs = 2, 2, 8
    full = list(itertools.islice(iter(PackedRowSampler(plan, mbs, gbs, 1, dp)), 40))
    resumed = list(itertools.islice(iter(PackedRowSampler(plan, mbs, gbs, 1, dp, consumed_rows=5 * gbs)), 30))
    assert resumed == full[10:]
    with pytest.raises(ValueError, match="consumed_rows"):
        PackedRowSampler(plan, mbs, gbs, 1, dp, consumed_rows=3)


def test_total_rows_and_len():
    plan = plan_for("prefpack")
    sampler = PackedRowSampler(plan, 2, 8, 0, 2, consumed_rows=8, total_rows=8 * 5 + 3)
    assert len(sampler) == len(list(sampler)) == 4 * 2
    with pytest.raises(TypeError):
        len(PackedRowSampler(plan, 2, 8, 0, 2))


def test_unpacked_group_rows_share_a_micro_batch():
    plan = plan_for("unpacked", k=3, sort=True)
    with pytest.raises(ValueError, match="multiple of the 3 responses"):
        PackedRowSampler(plan, 4, 8, 0, 2)
    sampler = PackedRowSampler(plan, 6, 12, 1, 2)
    for micro in itertools.islice(iter(sampler), 50):
        groups = [plan.rows[r][0][0] for r in micro]
        assert groups[0::3] == groups[1::3] == groups[2::3]
        # length-sorted plans move whole micro-batches: rows are neighbours in plan order
        assert max(micro) - min(micro) == 5
    mixed = pack(GroupLengths.from_arrays([3, 3], [[2, 2], [2]]), PackingConfig(16, "unpacked"))
    with pytest.raises(ValueError, match="same number of responses"):
        PackedRowSampler(mixed, 2, 2, 0, 1)


@pytest.mark.parametrize("layout", ["prefpack", "duplicated", "unpacked"])
def test_global_batch_counts_match_collated_batches(layout):
    rng = np.random.default_rng(4)
    groups = {
        i: TokenizedGroup(
            i,
            rng.integers(1, 99, rng.integers(1, 20)),
            [rng.integers(1, 99, rng.integers(1, 9)) for _ in "ab"],
        )
        for i in range(40)
    }
    plan = pack(GroupLengths.from_groups(list(groups.values())), PackingConfig(64, layout))
    dataset = PackedRowDataset(plan, groups.__getitem__, pad_id=0)
    assert len(dataset) == plan.num_rows
    mbs, dp, gbs = 2, 2, 8
    samplers = ranks(plan, mbs, gbs, dp)
    iters = [iter(s) for s in samplers]
    for g in range(6):
        micro_batches = [
            dataset.batch(next(it)) for it in iters for _ in range(samplers[0].num_micro_batches)
        ]
        counts = samplers[0].global_batch_counts(g)
        assert counts == samplers[1].global_batch_counts(g)
        assert counts.rows == gbs
        assert counts.groups == sum(b.num_groups for b in micro_batches)
        assert counts.responses == sum(b.num_responses for b in micro_batches)
        assert counts.response_tokens == sum(int(b.loss_mask.sum()) for b in micro_batches)


def test_torch_dataloader_with_sampler_and_collate():
    rng = np.random.default_rng(5)
    groups = {i: TokenizedGroup(i, rng.integers(1, 99, 5), [rng.integers(1, 99, 3)] * 2) for i in range(20)}
    plan = pack(GroupLengths.from_groups(list(groups.values())), PackingConfig(32, "prefpack"))
    dataset = PackedRowDataset(plan, groups.__getitem__, pad_id=0)
    sampler = PackedRowSampler(plan, 2, 4, 0, 2, total_rows=12)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate)
    batches = list(loader)
    assert len(batches) == len(sampler) == 3
    for batch, rows in zip(batches, sampler, strict=True):
        assert torch.equal(batch.tokens, dataset.batch(rows).tokens)


def test_argument_errors():
    plan = plan_for("prefpack")
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        PackedRowSampler(plan, 2, 6, 0, 2)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        PackedRowSampler(plan, 2, 8, 2, 2)
