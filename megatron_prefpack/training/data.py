"""From the config's ``data`` section to this rank's micro-batches.

The held-out split is a deterministic function of the group id (a multiplicative hash), so
SFT, DPO, reference log-probs and every parallel layout agree on it. Train and eval groups
are packed separately with the same :class:`PackingConfig`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_prefpack.data.batch import RowBatch
from megatron_prefpack.data.group_dataset import KINDS, GroupDataset
from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.packing import GroupLengths, PackingConfig, PackingPlan, pack, row_length_multiple
from megatron_prefpack.data.sampler import PackedRowDataset, PackedRowSampler
from megatron_prefpack.training.config import ConfigError, TrainConfig, config_error

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def held_out(group_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask: which ``group_ids`` belong to the held-out split (about ``fraction``).

    Fibonacci hashing of the id, so the split is stable when the dataset grows."""
    hashed = group_ids.astype(np.uint64) * _GOLDEN  # wraps mod 2**64 by design
    return (hashed >> np.uint64(11)).astype(np.float64) / float(2**53) < fraction


class FirstResponseView:
    """A dataset view whose groups keep only their first response (SFT on the chosen one)."""

    def __init__(self, dataset: GroupDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, group_id: int) -> TokenizedGroup:
        group = self.dataset[group_id]
        group.responses = group.responses[:1]
        group.scores = None if group.scores is None else group.scores[:1]
        return group


def group_lengths(dataset: GroupDataset, group_ids: np.ndarray, first_only: bool = False) -> GroupLengths:
    """The packer's view of ``group_ids`` (all responses, or only the first with ``first_only``)."""
    lengths = dataset.token_lengths()
    offsets = lengths.response_offsets
    if first_only:
        responses = [lengths.response[offsets[g] : offsets[g] + 1] for g in group_ids]
    else:
        responses = [lengths.response[offsets[g] : offsets[g + 1]] for g in group_ids]
    counts = np.array([len(r) for r in responses], dtype=np.int64)
    return GroupLengths(
        prompt=lengths.prompt[group_ids].astype(np.int64),
        response=np.concatenate(responses).astype(np.int64) if responses else np.zeros(0, np.int64),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        group_ids=group_ids.astype(np.int64),
    )


@dataclass
class TrainData:
    """The dataset, the two plans and the row datasets that materialise their rows."""

    dataset: GroupDataset
    train_plan: PackingPlan
    eval_plan: PackingPlan | None
    train_rows: PackedRowDataset
    eval_rows: PackedRowDataset | None
    pad_id: int

    def sampler(self, dp_rank: int, dp_size: int, cfg: TrainConfig, consumed_rows: int) -> PackedRowSampler:
        """The endless training sampler of this DP rank, resuming after ``consumed_rows``."""
        return PackedRowSampler(
            self.train_plan,
            cfg.data.micro_batch_size,
            cfg.data.global_batch_size,
            dp_rank,
            dp_size,
            consumed_rows=consumed_rows,
        )

    def eval_micro_batches(
        self, dp_rank: int, dp_size: int, micro_batch_size: int, max_rows: int | None, device: torch.device
    ) -> list[tuple[RowBatch, bool]]:
        """This rank's eval micro-batches as ``(batch, counted)``: contiguous chunks of
        ``micro_batch_size`` plan rows dealt round-robin over DP ranks (so a group's unpacked
        rows stay together); every rank gets the same number of chunks, the missing ones
        filled with repeats of chunk 0 marked ``counted=False``."""
        if self.eval_plan is None or self.eval_rows is None:
            return []
        rows = self.eval_plan.num_rows if max_rows is None else min(max_rows, self.eval_plan.num_rows)
        chunks = [list(range(s, min(s + micro_batch_size, rows))) for s in range(0, rows, micro_batch_size)]
        per_rank = -(-len(chunks) // dp_size)
        out = []
        for i in range(per_rank):
            index = i * dp_size + dp_rank
            counted = index < len(chunks)
            out.append((self.eval_rows.batch(chunks[index] if counted else chunks[0]).to(device), counted))
        return out


def groups_without_preference(dataset: GroupDataset, ranking: str = "pair") -> np.ndarray:
    """Group ids DPO with ``objective.dpo.ranking`` cannot train. ``pair``: groups that do not
    prefer response 0 over response 1 (``multi`` groups, groups with fewer than two responses,
    ``ranked`` groups whose first response does not score strictly higher than their second;
    ``pair`` groups are chosen-first by construction). ``all_pairs``: groups without scores
    (``multi``; tied responses just give no pair). ``plackett_luce``: those and ``ranked``
    groups with tied scores (it needs a strict order)."""
    kinds = dataset.kinds
    bad = kinds == KINDS.index("multi")
    ranked = kinds == KINDS.index("ranked")
    if ranking == "pair":
        too_few = dataset.token_lengths().num_responses < 2
        bad |= too_few
        for group_id in np.flatnonzero(ranked & ~too_few):
            scores = dataset.response_scores(int(group_id))
            bad[group_id] = not scores[0] > scores[1]  # NaN compares False: no preference either
    for group_id in np.flatnonzero(ranked) if ranking == "plackett_luce" else ():
        scores = dataset.response_scores(int(group_id))
        bad[group_id] = len(np.unique(scores)) < len(scores)
    return np.flatnonzero(bad)


_NO_PREFERENCE = {
    "pair": "dpo trains each group's response 0 (chosen) against response 1 (rejected), but {n} "
    "groups state no such preference ('multi' groups, or 'ranked' ones whose first response does "
    "not score strictly higher than the second",
    "all_pairs": "dpo with objective.dpo.ranking 'all_pairs' orders each group's responses by "
    "their scores, but {n} groups have none ('multi' groups",
    "plackett_luce": "dpo with objective.dpo.ranking 'plackett_luce' needs a strict order of "
    "each group's scores, but {n} groups have none or tied scores ('multi' groups or tied 'ranked' "
    "ones; ranking 'all_pairs' skips ties",
}


def _check_preferences(cfg: TrainConfig, dataset: GroupDataset) -> None:
    """Every group must state the preference the configured DPO ranking trains on."""
    ranking = cfg.objective.dpo.ranking
    bad = groups_without_preference(dataset, ranking)
    if len(bad):
        lines = [dataset[int(g)].meta["line"] for g in bad[:5]]
        reason = _NO_PREFERENCE[ranking].format(n=f"{len(bad)} of {len(dataset)}")
        raise config_error(
            cfg,
            "objective.type" if ranking == "pair" else "objective.dpo.ranking",
            f"{reason}; source lines {lines} of {cfg.data.path}). Train them with objective.type "
            "rm or sft, or reorder/filter them before preprocessing",
            related=["objective.dpo.ranking"] if ranking == "pair" else ["objective.type"],
        )


def _check_response_weights(cfg: TrainConfig, dataset: GroupDataset) -> None:
    """``objective.sft.response_weights`` must weigh every response index of the data."""
    weights = cfg.objective.sft.response_weights
    if weights is None:
        return
    bad = np.flatnonzero(dataset.token_lengths().num_responses > len(weights))
    if len(bad):
        lines = [dataset[int(g)].meta["line"] for g in bad[:5]]
        raise config_error(
            cfg,
            "objective.sft.response_weights",
            f"{len(weights)} weights, but {len(bad)} groups in {cfg.data.path} have more responses "
            f"(source lines {lines}): give one weight per response index",
        )


def build_data(cfg: TrainConfig, tensor_parallel: int, context_parallel: int) -> TrainData:
    """Open ``cfg.data.path``, split, and pack both splits for the row length of this layout.
    DPO refuses a dataset with groups that state no preference (:func:`groups_without_preference`),
    SFT one with more responses per group than ``objective.sft.response_weights`` weighs."""
    dataset = GroupDataset(cfg.data.path)
    if cfg.objective.type == "dpo":
        _check_preferences(cfg, dataset)
    if cfg.objective.type == "sft":
        _check_response_weights(cfg, dataset)
    pad_id = dataset.pad_id
    first_only = cfg.objective.type == "sft" and cfg.objective.sft.responses == "first"
    groups = FirstResponseView(dataset) if first_only else dataset
    ids = np.arange(len(dataset), dtype=np.int64)
    is_eval = held_out(ids, cfg.data.eval_fraction)
    try:
        packing = PackingConfig(
            seq_len=cfg.data.seq_len,
            layout=cfg.data.layout,
            sort_by_length=cfg.data.sort_by_length,
            seed=cfg.run.seed,
            tensor_parallel=tensor_parallel,
            context_parallel=context_parallel,
            sequence_parallel=cfg.parallel.sequence_parallel,
            skip_too_long=cfg.data.skip_too_long,
        )
        train_plan = pack(group_lengths(dataset, ids[~is_eval], first_only), packing)
        eval_plan = pack(group_lengths(dataset, ids[is_eval], first_only), packing) if is_eval.any() else None
    except ValueError as err:
        raise ConfigError(f"{cfg.source}: data: {err}") from None
    if train_plan.num_rows < cfg.data.global_batch_size:
        raise config_error(
            cfg,
            "data.global_batch_size",
            f"{cfg.data.global_batch_size} rows, but the training "
            f"split packs into only {train_plan.num_rows} rows",
        )
    pad_multiple = row_length_multiple(tensor_parallel, context_parallel, cfg.parallel.sequence_parallel)
    # Dynamic padding shortens unpacked rows; pipeline stages need one fixed row length.
    dynamic = pad_multiple if cfg.data.layout == "unpacked" and cfg.parallel.pipeline == 1 else None
    train_rows = PackedRowDataset(train_plan, groups.__getitem__, pad_id, dynamic)
    eval_rows = PackedRowDataset(eval_plan, groups.__getitem__, pad_id, dynamic) if eval_plan else None
    return TrainData(dataset, train_plan, eval_plan, train_rows, eval_rows, pad_id)


def micro_batches(data: TrainData, sampler: PackedRowSampler) -> Iterator[RowBatch]:
    """Materialised micro-batches of ``sampler``, in order."""
    for rows in sampler:
        yield data.train_rows.batch(rows)
