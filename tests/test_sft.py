"""Multi-response SFT: every response of a group is a target (e.g. Think-Fusion mode overlap)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_prefpack.data.batch import collate
from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.layout import build_row
from megatron_prefpack.losses.objectives import SFTObjective
from megatron_prefpack.losses.sft import sft_response_losses
from tests.objective_checks import assert_micro_batches_sum_to_whole, naive_response_stats

VOCAB = 16
ROW = 40
THINK, END_THINK = 14, 15


def _mode_overlap_groups() -> dict[int, TokenizedGroup]:
    """Each prompt answered once with ``<think>..</think>`` reasoning and once without."""
    rng = np.random.default_rng(0)
    groups = {}
    for gid, (p, think, plain) in {2: (4, 5, 3), 6: (3, 6, 2), 9: (5, 4, 4)}.items():
        reasoning = np.concatenate([[THINK], rng.integers(1, 14, think), [END_THINK]])
        answer = rng.integers(1, 14, plain)
        responses = [np.concatenate([reasoning, answer]), answer]
        groups[gid] = TokenizedGroup(gid, rng.integers(1, 14, p), responses, kind="multi")
    return groups


def _rows(groups: dict[int, TokenizedGroup], layout: list[list[int]]) -> list:
    return [
        build_row([(g, groups[g].prompt, list(enumerate(groups[g].responses))) for g in gids], ROW, 0)
        for gids in layout
    ]


def _naive_nll(logits: torch.Tensor, rows: list, groups: dict) -> dict[tuple[int, int], tuple[float, int]]:
    """(group, k) -> (NLL sum, tokens), read straight from the logits at each segment."""
    return {key: (-logp, n) for key, (logp, _, n) in naive_response_stats(logits, rows, groups).items()}


def test_sft_response_losses_for_both_reductions() -> None:
    sums, tokens = torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])
    torch.testing.assert_close(sft_response_losses(sums, tokens), torch.tensor([6.0, 2.0]))
    torch.testing.assert_close(sft_response_losses(sums, tokens, "response"), torch.tensor([2.0, 0.5]))
    with pytest.raises(ValueError, match="reduction"):
        sft_response_losses(sums, tokens, "sequence")


@pytest.mark.parametrize("reduction", ["token", "response"])
def test_sft_objective_is_the_global_mean_over_all_responses(reduction: str) -> None:
    groups = _mode_overlap_groups()
    rows = _rows(groups, [[2, 6], [9]])
    logits = torch.randn(2, ROW, VOCAB, generator=torch.Generator().manual_seed(0))
    naive = _naive_nll(logits, rows, groups)
    objective = SFTObjective(reduction)
    batch = collate(rows, groups)
    total = objective.count(batch)
    out = objective(batch, logits.clone(), total)

    if reduction == "token":
        assert total == sum(n for _, n in naive.values())
        expected = sum(nll for nll, _ in naive.values()) / total
    else:
        assert total == 6
        expected = sum(nll / n for nll, n in naive.values()) / total
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["loss"].item() == pytest.approx(expected * total, rel=1e-5)


@pytest.mark.parametrize("reduction", ["token", "response"])
def test_sft_micro_batches_sum_to_the_whole_batch_loss_and_gradient(reduction: str) -> None:
    groups = _mode_overlap_groups()
    rows = _rows(groups, [[2, 6], [9]])
    logits = torch.randn(2, ROW, VOCAB, generator=torch.Generator().manual_seed(1))
    objective = SFTObjective(reduction)
    total = objective.count(collate(rows, groups))

    whole, grad = assert_micro_batches_sum_to_whole(
        lambda ids, leaf: objective(collate([rows[i] for i in ids], groups), leaf[ids], total),
        logits,
        num_rows=2,
        splits=[[0], [1]],
    )
    assert whole.count == total
    # Gradient only reaches positions that predict a response token.
    assert (grad.abs().sum(-1) > 0).equal(collate(rows, groups).loss_mask)


def test_sft_first_only_trains_on_response_zero() -> None:
    groups = _mode_overlap_groups()
    rows = _rows(groups, [[2, 6], [9]])
    logits = torch.randn(2, ROW, VOCAB, generator=torch.Generator().manual_seed(2))
    naive = _naive_nll(logits, rows, groups)
    objective = SFTObjective("token", first_only=True)
    batch = collate(rows, groups)
    total = objective.count(batch)
    assert total == sum(n for (_, k), (_, n) in naive.items() if k == 0)
    expected = sum(nll for (_, k), (nll, _) in naive.items() if k == 0) / total
    assert objective(batch, logits.clone(), total).loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        SFTObjective("sequence")


# --- mode weights (Think-Fusion: response 0 thinking, response 1 plain) ------------------


@pytest.mark.parametrize("reduction", ["token", "response"])
def test_response_weights_scale_each_index_and_log_per_mode_means(reduction: str) -> None:
    from megatron_prefpack.training.train import _means

    groups = _mode_overlap_groups()
    rows = _rows(groups, [[2, 6], [9]])
    logits = torch.randn(2, ROW, VOCAB, generator=torch.Generator().manual_seed(3))
    naive = _naive_nll(logits, rows, groups)
    objective = SFTObjective(reduction, response_weights=(1.0, 0.25))
    assert objective.metric_keys == (
        "loss",
        "loss/response_0",
        "count/loss/response_0",
        "loss/response_1",
        "count/loss/response_1",
    )
    batch = collate(rows, groups)
    total = objective.count(batch)
    assert total == SFTObjective(reduction).count(batch)  # the count stays unweighted

    def term(nll: float, n: int) -> float:
        return nll if reduction == "token" else nll / n

    units = {
        k: sum(n if reduction == "token" else 1 for (_, kk), (_, n) in naive.items() if kk == k)
        for k in (0, 1)
    }
    per_mode = {k: sum(term(nll, n) for (_, kk), (nll, n) in naive.items() if kk == k) for k in (0, 1)}
    whole, _ = assert_micro_batches_sum_to_whole(
        lambda ids, leaf: objective(collate([rows[i] for i in ids], groups), leaf[ids], total),
        logits,
        num_rows=2,
        splits=[[0], [1]],
    )
    expected = (per_mode[0] + 0.25 * per_mode[1]) / total
    assert whole.loss.item() == pytest.approx(expected, rel=1e-5)
    sums = {"count": float(whole.count), **{k: float(v) for k, v in whole.metrics.items()}}
    means = _means(sums)
    assert set(means) == {"loss", "loss/response_0", "loss/response_1"}
    assert means["loss"] == pytest.approx(expected, rel=1e-5)
    for k in (0, 1):
        assert sums[f"count/loss/response_{k}"] == units[k]
        assert means[f"loss/response_{k}"] == pytest.approx(per_mode[k] / units[k], rel=1e-5)
    # All-ones weights are no weights.
    ones = SFTObjective(reduction, response_weights=(1.0, 1.0))(batch, logits.clone(), total)
    plain = SFTObjective(reduction)(batch, logits.clone(), total)
    torch.testing.assert_close(ones.loss, plain.loss)


def test_response_weights_refusals_name_the_key() -> None:
    from megatron_prefpack.training.config import ConfigError, read_config

    groups = _mode_overlap_groups()
    batch = collate(_rows(groups, [[2, 6], [9]]), groups)
    with pytest.raises(
        ValueError, match=r"objective\.sft\.response_weights has 1 weights, but groups \[2, 6, 9\]"
    ):
        SFTObjective(response_weights=(1.0,)).count(batch)
    with pytest.raises(ValueError, match=r"objective\.sft\.response_weights needs every response"):
        SFTObjective(first_only=True, response_weights=(1.0,))
    with pytest.raises(ValueError, match=r"objective\.sft\.response_weights must be finite"):
        SFTObjective(response_weights=(1.0, -0.5))
    base = ["model.preset=tiny-dense", "objective.type=sft"]
    for value, message in (
        ("[1, -1]", "objective.sft.response_weights: must be a non-empty list of finite numbers >= 0"),
        ("[]", "objective.sft.response_weights: must be a non-empty list"),
        ("[1, .nan]", "objective.sft.response_weights: must be a non-empty list"),
    ):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
            read_config(None, [*base, f"objective.sft.response_weights={value}"])
    with pytest.raises(ConfigError, match=r"objective\.sft\.response_weights: .*responses 'first'"):
        read_config(None, [*base, "objective.sft.response_weights=[1]", "objective.sft.responses=first"])
    cfg = read_config(None, [*base, "objective.sft.response_weights=[1, 0.5]"])
    assert cfg.objective.sft.response_weights == [1, 0.5]
