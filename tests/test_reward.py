"""Reward head in GPTModel's output slot, reading rewards at EOS, and the ranking losses."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from megatron_prefpack.data.layout import build_row
from megatron_prefpack.losses.ranking import ranking_pairs
from megatron_prefpack.losses.reward import (
    RewardHead,
    bradley_terry_losses,
    ranking_group_losses,
    response_end_rewards,
    response_end_slots,
)
from tests.distributed import run_distributed
from tests.objective_checks import assert_micro_batches_sum_to_whole


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_head_output_shape_ignores_tied_weight_and_is_seeded() -> None:
    head = RewardHead(8, seed=3)
    hidden = torch.randn(5, 2, 8)
    rewards, bias = head(hidden, weight=torch.randn(100, 8), runtime_gather_output=True)
    assert rewards.shape == (5, 2, 1) and bias is None
    torch.testing.assert_close(rewards, hidden @ head.weight.t())
    torch.testing.assert_close(RewardHead(8, seed=3).weight, head.weight)
    assert float(head.weight.detach().std()) < 1.0
    assert not RewardHead(8, init_std=0.0).weight.any()


def test_rewards_are_read_at_each_response_eos_token() -> None:
    from megatron_prefpack.data.batch import collate
    from megatron_prefpack.data.groups import TokenizedGroup

    groups = {
        4: TokenizedGroup(4, np.array([1, 2, 3]), [np.array([5, 6, 2]), np.array([7, 2])]),
        8: TokenizedGroup(8, np.array([9]), [np.array([2])]),
        6: TokenizedGroup(6, np.array([3, 4]), [np.array([8, 2]), np.array([2]), np.array([9, 9, 2])]),
    }

    def row(gids: list[int]):
        return build_row([(g, groups[g].prompt, list(enumerate(groups[g].responses))) for g in gids], 16, 0)

    rows = [row([4, 8]), row([6])]
    batch = collate(rows, groups)
    # By hand: response n's EOS is the last token of its segment, in collate's order.
    expected = [(r, seg.end - 1) for r, rw in enumerate(rows) for g in rw.groups for seg in g.segments]
    assert len(expected) == batch.num_responses == 6
    assert all(rows[r].tokens[e] == 2 for r, e in expected)  # the EOS token of each response
    slots = response_end_slots(batch)
    assert [
        (int(r), int(e)) for r, e in zip(*torch.nonzero(slots >= 0, as_tuple=True), strict=True)
    ] == expected
    assert slots[slots >= 0].tolist() == list(range(6))

    token_rewards = torch.arange(32.0).view(2, 16, 1).requires_grad_(True)
    rewards = response_end_rewards(token_rewards, batch)
    torch.testing.assert_close(rewards, torch.tensor([16.0 * r + e for r, e in expected]))
    rewards.sum().backward()
    assert token_rewards.grad.squeeze(-1)[slots >= 0].eq(1).all() and token_rewards.grad.sum() == 6
    cut = dataclasses.replace(batch, segment_ids=batch.segment_ids.clone())
    cut.segment_ids[1, 6:] = -1  # group 6's last segment lost its tokens
    with pytest.raises(ValueError, match=r"responses \[5\] do not have exactly one EOS"):
        response_end_rewards(token_rewards.detach(), cut)


def test_bradley_terry_with_margin() -> None:
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    losses = bradley_terry_losses(chosen, rejected)
    torch.testing.assert_close(losses, torch.tensor([softplus(-1.0), softplus(1.0)]))
    with_margin = bradley_terry_losses(chosen, rejected, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(with_margin, torch.tensor([softplus(-0.5), softplus(1.0)]))


def test_ranking_forms_all_ordered_pairs_within_groups_and_skips_ties() -> None:
    group_ids = torch.tensor([7, 7, 7, 3, 3, 5, 5])
    scores = torch.tensor([0.2, 0.9, 0.5, 1.0, 0.0, 1.0, 1.0])
    winners, losers = ranking_pairs(group_ids, scores)
    assert sorted(zip(winners.tolist(), losers.tolist(), strict=True)) == [(1, 0), (1, 2), (2, 0), (3, 4)]
    with pytest.raises(ValueError, match=r"groups \[3\] have responses without a score"):
        ranking_pairs(group_ids, scores.index_fill(0, torch.tensor([4]), float("nan")))


def test_ranking_group_losses_average_pairs_per_group_instructgpt_style() -> None:
    group_ids = torch.tensor([7, 7, 7, 3, 3, 5, 5])
    scores = torch.tensor([0.2, 0.9, 0.5, 1.0, 0.0, 1.0, 1.0])
    rewards = torch.tensor([0.0, 1.0, 3.0, 2.0, 0.5, 9.0, -9.0])
    margins = torch.tensor([math.nan] * 3 + [0.25] * 2 + [math.nan] * 2)
    losses, pairs = ranking_group_losses(rewards, group_ids, scores, margins=margins)
    # Groups in ascending id: 3 (one pair, margin 0.25), 7 (three pairs, no margin); 5 only ties.
    expected_3 = softplus(-(2.0 - 0.5 - 0.25))
    expected_7 = (softplus(-(1.0 - 0.0)) + softplus(-(1.0 - 3.0)) + softplus(-(3.0 - 0.0))) / 3
    torch.testing.assert_close(losses, torch.tensor([expected_3, expected_7]))
    assert pairs.pair_groups.tolist() == [1, 1, 1, 0] and pairs.group_ids.tolist() == [3, 7]
    assert pairs.winners.tolist() == [1, 1, 2, 3] and pairs.losers.tolist() == [0, 2, 0, 4]
    assert pairs.response_groups(group_ids).tolist() == [1, 1, 1, 0, 0, -1, -1]


def test_centering_adds_trl_pair_sum_square() -> None:
    # One pair per group: TRL's loss + c * mean((r_c + r_r)^2).
    group_ids = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    rewards = torch.tensor([1.5, -0.5, 0.2, 0.4])
    losses, *_ = ranking_group_losses(rewards, group_ids, scores, center_coefficient=0.01)
    trl_loss = (softplus(-2.0) + softplus(0.2)) / 2 + 0.01 * ((1.0**2) + (0.6**2)) / 2
    assert losses.mean().item() == pytest.approx(trl_loss)


def _tiny_gpt(tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=4,
        ffn_hidden_size=32,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return GPTModel(
        config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=32,
        max_sequence_length=16,
        share_embeddings_and_output_weights=True,
    )


def _gpt_worker(tp: int, tokens: torch.Tensor) -> dict:
    """Build a tiny tied-embedding GPTModel, attach the head, run forward/backward."""
    from megatron.core import parallel_state

    from megatron_prefpack.losses.reward import attach_reward_head
    from megatron_prefpack.platform.distributed import initialize

    initialize(tensor_parallel=tp)
    model = _tiny_gpt(tp)
    attach_reward_head(model, seed=1)
    assert not model.share_embeddings_and_output_weights
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    rewards = model(tokens, positions, attention_mask=None)
    (rewards.squeeze(-1) * torch.linspace(-1, 1, tokens.numel()).view_as(tokens)).sum().backward()
    return {
        "rewards": rewards.detach(),
        "head_grad": model.output_layer.weight.grad,
        "embedding_grad": model.embedding.word_embeddings.weight.grad,
        "state_keys": {k: tuple(v.shape) for k, v in model.state_dict().items() if "output_layer" in k},
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
    }


@pytest.mark.slow
def test_attached_head_gives_same_rewards_and_grads_at_tp1_and_tp2_sequence_parallel() -> None:
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    (single,) = run_distributed(_gpt_worker, 1, 1, tokens)
    assert single["rewards"].shape == (2, 8, 1)
    assert single["state_keys"] == {"output_layer.weight": (1, 16)}
    ranks = run_distributed(_gpt_worker, 2, 2, tokens)
    for rank in ranks:
        torch.testing.assert_close(rank["rewards"], single["rewards"], rtol=1e-5, atol=1e-5)
        # The head's gradient is complete on every TP rank (no reduction needed).
        torch.testing.assert_close(rank["head_grad"], single["head_grad"], rtol=1e-5, atol=1e-5)
    # Vocab-sharded embedding gradients concatenate to the TP=1 gradient: the sequence-parallel
    # gather's backward splits instead of summing the replicated gradient over TP.
    sharded = torch.cat([r["embedding_grad"] for r in sorted(ranks, key=lambda r: r["tp_rank"])])
    torch.testing.assert_close(sharded, single["embedding_grad"], rtol=1e-5, atol=1e-5)


def _rm_batch_rows():
    from megatron_prefpack.data.groups import TokenizedGroup
    from megatron_prefpack.data.layout import build_row

    rng = np.random.default_rng(0)
    spec = {  # gid: (prompt length, response lengths, scores, margin)
        4: (3, [2, 3], [1.0, 0.0], 0.5),
        7: (2, [2, 1, 3], [0.1, 0.7, 0.3], None),
        9: (4, [3, 2], [2.0, 2.0], None),  # a tie: no pair, not counted
        2: (2, [4, 2], [0.0, 1.0], None),
    }
    groups = {
        gid: TokenizedGroup(
            gid, rng.integers(1, 30, p), [rng.integers(1, 30, r) for r in rs], "ranked", sc, m
        )
        for gid, (p, rs, sc, m) in spec.items()
    }
    layout = [[4, 7], [9, 2]]
    rows = [
        build_row([(g, groups[g].prompt, list(enumerate(groups[g].responses))) for g in gids], 20, 0)
        for gids in layout
    ]
    return groups, rows


def test_reward_objective_micro_batches_sum_to_the_global_mean_over_ranked_groups() -> None:
    from megatron_prefpack.data.batch import collate
    from megatron_prefpack.losses.objectives import RewardObjective

    groups, rows = _rm_batch_rows()
    token_rewards = torch.randn(2, 20, 1, generator=torch.Generator().manual_seed(0))
    objective = RewardObjective(center_coefficient=0.05)
    whole_batch = collate(rows, groups)
    total = objective.count(whole_batch)
    assert total == 3

    whole, _ = assert_micro_batches_sum_to_whole(
        lambda ids, leaf: objective(collate([rows[i] for i in ids], groups), leaf[ids], total),
        token_rewards,
        num_rows=2,
        splits=[[0], [1]],
    )

    # By hand: rewards at each response's EOS token, pairs by score, mean per group, mean over groups.
    reward = {}
    for r, row in enumerate(rows):
        for placement in row.groups:
            for seg in placement.segments:
                reward[(placement.group_id, seg.response_index)] = float(token_rewards[r, seg.end - 1, 0])

    def pair(g: int, w: int, lose: int, margin: float = 0.0) -> float:
        rw, rl = reward[(g, w)], reward[(g, lose)]
        return softplus(-(rw - rl - margin)) + 0.05 * (rw + rl) ** 2

    group_4 = pair(4, 0, 1, margin=0.5)
    group_7 = (pair(7, 1, 0) + pair(7, 1, 2) + pair(7, 2, 0)) / 3
    group_2 = pair(2, 1, 0)
    assert whole.loss.item() == pytest.approx((group_4 + group_7 + group_2) / 3, rel=1e-5)
    accuracy_7 = sum(reward[(7, w)] > reward[(7, lo)] for w, lo in ((1, 0), (1, 2), (2, 0))) / 3
    expected_accuracy = (reward[(4, 0)] > reward[(4, 1)]) + accuracy_7 + (reward[(2, 1)] > reward[(2, 0)])
    assert whole.metrics["rewards/accuracies"].item() == pytest.approx(expected_accuracy)


# --- context parallelism: a response's EOS token may sit on either CP rank -------------------


def _rm_cp_worker(cp: int, state: dict | None, rows: list, groups: dict) -> dict:
    """A tiny dense reward model (``state``: its weights) on CP ``cp``: rewards, loss, metrics
    and the gradients of the head and of a layer, summed over the CP ranks (each rank holds
    its tokens' share; the trainer's gradient reduction adds them)."""
    from megatron.core import parallel_state

    from megatron_prefpack.data.batch import collate
    from megatron_prefpack.losses.objectives import RewardObjective
    from megatron_prefpack.losses.reward import attach_reward_head
    from megatron_prefpack.models.forward import cp_local, model_forward
    from megatron_prefpack.platform.distributed import initialize
    from tests.test_model_equivalence import build

    initialize(context_parallel=cp)
    _, model = build("tiny-dense")
    attach_reward_head(model, seed=1)
    if state is not None:
        model.load_state_dict(state)
    batch = collate(rows, groups)
    group = parallel_state.get_context_parallel_group() if cp > 1 else None
    objective = RewardObjective(center_coefficient=0.05, cp_group=group)
    output = model_forward(model, batch, backend="reference")
    local = cp_local(batch)
    out = objective(local, output, objective.count(batch))
    out.loss.backward()
    layer = model.decoder.layers[0].self_attention.linear_qkv.weight
    grads = torch.stack([model.output_layer.weight.grad.flatten().sum(), layer.grad.sum()])
    full = [model.output_layer.weight.grad, layer.grad]
    if group is not None:
        for grad in full:
            torch.distributed.all_reduce(grad, group=group)
    return {
        "rewards": response_end_rewards(output.detach(), local, group),
        "loss": out.loss.detach(),
        "metrics": out.metrics,
        "head_grad": full[0],
        "layer_grad": full[1],
        "local_grad_sums": grads,
        "state": {k: v for k, v in model.state_dict().items() if "_extra_state" not in k},
    }


@pytest.mark.slow
def test_reward_model_under_context_parallel_equals_one_process() -> None:
    from megatron_prefpack.attention.context_parallel import cp_positions

    groups, rows = _rm_batch_rows()
    (single,) = run_distributed(_rm_cp_worker, 1, 1, None, rows, groups)
    ends = [(r, seg.end - 1) for r, row in enumerate(rows) for g in row.groups for seg in g.segments]
    held_by = [int(e in cp_positions(20, 2, 1).tolist()) for _, e in ends]
    assert 0 < sum(held_by) < len(held_by)  # EOS tokens on both CP ranks
    ranks = run_distributed(_rm_cp_worker, 2, 2, single["state"], rows, groups)
    for rank in ranks:
        torch.testing.assert_close(rank["rewards"], single["rewards"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["loss"], single["loss"], rtol=1e-5, atol=1e-6)
        for key, value in single["metrics"].items():
            torch.testing.assert_close(rank["metrics"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(rank["head_grad"], single["head_grad"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rank["layer_grad"], single["layer_grad"], rtol=1e-4, atol=1e-6)
    # Both ranks contribute to the gradient (neither holds all of it).
    assert all(r["local_grad_sums"].abs().min() > 0 for r in ranks)
    assert not torch.allclose(ranks[0]["local_grad_sums"], single["local_grad_sums"], rtol=1e-3)
