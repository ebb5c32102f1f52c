"""The order of a group's responses from their scores (higher = better), shared by reward models
and DPO over rankings: every ordered pair ``(winner, loser)`` of a group, the groups that have
at least one, and per-group means over their pairs. Ties give no pair; a missing (NaN) score is
an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ranking_pairs(group_ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs ``(winner, loser)`` of responses of one group with a higher score, ``(P,)`` each.

    ``group_ids`` (N,) int and ``scores`` (N,) float index the same responses. Ties give no
    pair. A NaN score raises: ranking needs a score for every response.
    """
    if bool(torch.isnan(scores).any()):
        groups = sorted(set(group_ids[torch.isnan(scores)].tolist()))
        raise ValueError(
            f"groups {groups} have responses without a score; ranking them (reward models, DPO "
            "rankings) needs scores"
        )
    same_group = group_ids[:, None] == group_ids[None, :]
    better = scores[:, None] > scores[None, :]
    winners, losers = torch.nonzero(same_group & better, as_tuple=True)
    return winners, losers


@dataclass
class RankedPairs:
    """The ordered pairs of a batch's ranked groups (:func:`ranked_pairs`): ``winners`` and
    ``losers`` ``(P,)`` index the batch's responses; ``pair_groups`` ``(P,)`` indexes the
    ``group_ids`` ``(G,)`` of the groups with at least one ordered pair, ascending."""

    winners: torch.Tensor
    losers: torch.Tensor
    pair_groups: torch.Tensor
    group_ids: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.numel())

    def group_means(self, values: torch.Tensor) -> torch.Tensor:
        """Each ranked group's mean of the per-pair ``values`` ``(P,)`` over its pairs, ``(G,)``."""
        sums = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        sums = sums.index_add(0, self.pair_groups, values)
        return sums / torch.bincount(self.pair_groups, minlength=self.num_groups).to(values.dtype)

    def response_groups(self, group_ids: torch.Tensor) -> torch.Tensor:
        """For each response (its group id in ``group_ids`` ``(N,)``), the index of its ranked
        group, or -1 where its group has no ordered pair; ``(N,)`` int64."""
        if not self.num_groups:
            return torch.full_like(group_ids, -1)
        index = torch.searchsorted(self.group_ids, group_ids).clamp(max=self.num_groups - 1)
        return torch.where(self.group_ids[index] == group_ids, index, -1)


def ranked_pairs(group_ids: torch.Tensor, scores: torch.Tensor) -> RankedPairs:
    """:func:`ranking_pairs` with each pair's group: groups whose responses all tie (or that
    have a single response) have no pair and are not among the ranked groups."""
    winners, losers = ranking_pairs(group_ids, scores)
    ids, pair_groups = torch.unique(group_ids[winners], return_inverse=True)
    return RankedPairs(winners, losers, pair_groups, ids)
