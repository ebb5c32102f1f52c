"""DPO-family losses against numbers computed by hand from the papers' definitions.

TRL is not installed here (it pulls transformers, datasets, pyarrow and pandas), so every
expected value below is written out with ``math`` from the published formulas, and TRL's
``DPOTrainer`` losses are re-implemented from its source in :func:`trl_dpo_loss`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_prefpack.losses.dpo import DPOConfig, dpo_losses
from tests.objective_checks import assert_micro_batches_sum_to_whole


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# One pair: the policy moved +1 nat towards chosen and -1 nat away from rejected (z = 2).
PI_C, PI_R, REF_C, REF_R = -10.0, -12.0, -11.0, -11.0
N_C, N_R = 5, 4


def one(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64)


def run(
    config: DPOConfig, pi_c: float = PI_C, pi_r: float = PI_R, ref_c: float = REF_C, ref_r: float = REF_R
):
    out = dpo_losses(
        config, one(pi_c), one(pi_r), one(ref_c), one(ref_r), torch.tensor([N_C]), torch.tensor([N_R])
    )
    return out.losses.item(), out.chosen_rewards.item(), out.rejected_rewards.item()


def test_sigmoid_is_dpo_and_rewards_are_beta_log_ratios() -> None:
    loss, chosen, rejected = run(DPOConfig("sigmoid", beta=0.1))
    assert loss == pytest.approx(softplus(-0.2))  # -log sigmoid(beta * z), z = 2
    assert chosen == pytest.approx(0.1)
    assert rejected == pytest.approx(-0.1)


def test_conservative_dpo_mixes_both_label_directions() -> None:
    loss, _, _ = run(DPOConfig("sigmoid", beta=0.1, label_smoothing=0.1))
    assert loss == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2))


def test_robust_dpo_value_and_unbiasedness_under_label_flips() -> None:
    eps, beta = 0.2, 0.5
    loss, _, _ = run(DPOConfig("robust", beta=beta, label_smoothing=eps))
    assert loss == pytest.approx((0.8 * softplus(-1.0) - 0.2 * softplus(1.0)) / 0.6)
    # Chowdhury et al.: with labels flipped at rate eps, the expected robust loss is the clean DPO loss.
    flipped, _, _ = run(DPOConfig("robust", beta=beta, label_smoothing=eps), PI_R, PI_C, REF_R, REF_C)
    assert (1 - eps) * loss + eps * flipped == pytest.approx(softplus(-beta * 2))
    # ... which conservative DPO is not.
    c_loss, _, _ = run(DPOConfig("sigmoid", beta=beta, label_smoothing=eps))
    c_flip, _, _ = run(DPOConfig("sigmoid", beta=beta, label_smoothing=eps), PI_R, PI_C, REF_R, REF_C)
    assert (1 - eps) * c_loss + eps * c_flip != pytest.approx(softplus(-beta * 2))


def test_all_sigmoid_variants_agree_at_eps_zero_and_give_log2_at_z_zero() -> None:
    for loss_type in ("sigmoid", "robust"):
        assert run(DPOConfig(loss_type, beta=0.3))[0] == pytest.approx(softplus(-0.6))
        assert run(DPOConfig(loss_type, beta=0.3), ref_c=PI_C, ref_r=PI_R)[0] == pytest.approx(math.log(2))


def test_hinge_is_zero_beyond_the_margin() -> None:
    assert run(DPOConfig("hinge", beta=0.1))[0] == pytest.approx(0.8)  # max(0, 1 - 0.1 * 2)
    assert run(DPOConfig("hinge", beta=1.0))[0] == 0.0  # 1 - 2 < 0


def test_ipo_is_squared_distance_to_half_inverse_beta_of_per_token_log_ratios() -> None:
    loss, chosen, rejected = run(DPOConfig("ipo", beta=0.1))
    z = 1 / N_C - (-1) / N_R  # each log-ratio divided by its length (TRL's IPO)
    assert loss == pytest.approx((z - 5) ** 2)
    assert chosen == pytest.approx(0.1 / N_C)
    assert rejected == pytest.approx(-0.1 / N_R)
    assert DPOConfig("ipo").normalizes_length and not DPOConfig("sigmoid").normalizes_length


def test_length_normalize_false_gives_ipo_on_sums_and_true_normalises_sigmoid() -> None:
    assert run(DPOConfig("ipo", beta=0.1, length_normalize=False))[0] == pytest.approx((2 - 5) ** 2)
    assert run(DPOConfig("ipo", beta=0.25, length_normalize=False))[0] == pytest.approx(0.0)  # z = 2
    loss, chosen, _ = run(DPOConfig("sigmoid", beta=0.1, length_normalize=True))
    assert loss == pytest.approx(softplus(-0.1 * (1 / N_C + 1 / N_R)))
    assert chosen == pytest.approx(0.1 / N_C)


def trl_dpo_loss(
    loss_type: str,
    beta: float,
    label_smoothing: float,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-pair losses as TRL's ``DPOTrainer`` computes them (trl/trainer/dpo_trainer.py at
    f2cd577, ``f_divergence_type="reverse_kl"``): log-prob sums over the completion tokens,
    ``*_mask`` the ``(P, T)`` completion masks whose row sums are the lengths."""
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return -torch.nn.functional.logsigmoid(beta * delta_score)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(beta * delta_score)
        flipped = -label_smoothing * torch.nn.functional.logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    assert loss_type == "ipo"
    chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
    rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
    return (chosen_avg_score - rejected_avg_score - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps"),
    [("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0), ("sigmoid", 0.1, 0.0), ("hinge", 0.3, 0.0), ("robust", 0.2, 0.3)],
)
def test_defaults_equal_trl_on_random_pairs(loss_type: str, beta: float, eps: float) -> None:
    gen = torch.Generator().manual_seed(7)
    pairs, width = 64, 200
    lengths = torch.randint(1, width + 1, (2, pairs), generator=gen)
    # per-token log-probs of policy and reference, masked to each completion
    mask = (torch.arange(width)[None, None, :] < lengths[:, :, None]).double()
    per_token = -torch.rand(4, 2, pairs, width, generator=gen, dtype=torch.float64) * 3
    sums = (per_token * mask).sum(-1)  # (policy, reference) x (chosen, rejected) ... per pair
    pi_c, pi_r, ref_c, ref_r = sums[0, 0], sums[0, 1], sums[1, 0], sums[1, 1]
    ours = dpo_losses(
        DPOConfig(loss_type, beta=beta, label_smoothing=eps), pi_c, pi_r, ref_c, ref_r, *lengths
    )
    trl = trl_dpo_loss(loss_type, beta, eps, pi_c, pi_r, ref_c, ref_r, mask[0], mask[1])
    torch.testing.assert_close(ours.losses, trl, rtol=1e-12, atol=1e-12)


def test_simpo_is_reference_free_length_normalised_with_margin() -> None:
    config = DPOConfig("simpo", beta=2.0, simpo_gamma=0.5)
    out = dpo_losses(config, one(PI_C), one(PI_R), None, None, torch.tensor([N_C]), torch.tensor([N_R]))
    u = 2.0 * (PI_C / N_C) - 2.0 * (PI_R / N_R) - 0.5  # 2*(-2) - 2*(-3) - 0.5 = 1.5
    assert out.losses.item() == pytest.approx(softplus(-u))
    assert out.chosen_rewards.item() == pytest.approx(-4.0)
    assert out.rejected_rewards.item() == pytest.approx(-6.0)
    # The reference model has no influence at all.
    assert run(config)[0] == pytest.approx(run(config, ref_c=0.0, ref_r=-100.0)[0])
    smoothed = run(DPOConfig("simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1))[0]
    assert smoothed == pytest.approx(0.9 * softplus(-u) + 0.1 * softplus(u))


def test_rpo_adds_the_chosen_per_token_nll() -> None:
    base = run(DPOConfig("sigmoid", beta=0.1))[0]
    with_rpo = run(DPOConfig("sigmoid", beta=0.1, rpo_alpha=0.5))[0]
    assert with_rpo == pytest.approx(base + 0.5 * (-PI_C / N_C))


def test_sigmoid_gradient_matches_the_closed_form() -> None:
    beta = 0.1
    pi_c = torch.tensor([PI_C, -3.0], dtype=torch.float64, requires_grad=True)
    pi_r = torch.tensor([PI_R, -1.0], dtype=torch.float64, requires_grad=True)
    ref_c = torch.tensor([REF_C, -3.5], dtype=torch.float64)
    ref_r = torch.tensor([REF_R, -2.0], dtype=torch.float64)
    out = dpo_losses(
        DPOConfig(beta=beta), pi_c, pi_r, ref_c, ref_r, torch.tensor([5, 2]), torch.tensor([4, 3])
    )
    out.losses.sum().backward()
    z = (pi_c - ref_c) - (pi_r - ref_r)
    expected = -beta * torch.sigmoid(-beta * z.detach())  # d/dpi_c of -log sigmoid(beta z)
    torch.testing.assert_close(pi_c.grad, expected)
    torch.testing.assert_close(pi_r.grad, -expected)
    assert not out.chosen_rewards.requires_grad


def test_missing_reference_and_bad_configs_are_refused() -> None:
    t = torch.zeros(1)
    n = torch.ones(1, dtype=torch.long)
    with pytest.raises(ValueError, match="needs reference"):
        dpo_losses(DPOConfig("sigmoid"), t, t, None, None, n, n)
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig("kto")
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="no meaning"):
        DPOConfig("ipo", label_smoothing=0.1)
    assert DPOConfig("sigmoid").needs_reference and not DPOConfig("simpo").needs_reference


# --- the DPO objective over packed micro-batches -------------------------------------------

VOCAB = 16
ROW = 24


def _groups() -> dict:
    from megatron_prefpack.data.groups import TokenizedGroup

    rng = np.random.default_rng(0)
    shapes = {3: (4, [3, 5]), 8: (2, [6, 2]), 5: (5, [2, 2]), 1: (3, [7, 4])}
    return {
        gid: TokenizedGroup(gid, rng.integers(1, VOCAB, p), [rng.integers(1, VOCAB, r) for r in rs])
        for gid, (p, rs) in shapes.items()
    }


def _rows(groups: dict, layout: list[list[int]]) -> list:
    from megatron_prefpack.data.layout import build_row

    return [
        build_row([(g, groups[g].prompt, list(enumerate(groups[g].responses))) for g in gids], ROW, 0)
        for gids in layout
    ]


def _naive_logp(logits: torch.Tensor, response: np.ndarray, start: int) -> float:
    """Sum of log p(response) read from one row's logits at the segment starting at ``start``."""
    logps = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logps[start + i, int(tok)]) for i, tok in enumerate(response))


def test_dpo_objective_micro_batches_sum_to_the_global_mean_with_equal_gradients() -> None:
    from megatron_prefpack.data.batch import collate
    from megatron_prefpack.losses.objectives import DPOObjective

    groups = _groups()
    layout = [[3, 8], [5], [1]]
    rows = _rows(groups, layout)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(rows), ROW, VOCAB, generator=gen, dtype=torch.float64).float()
    reference = {(g, k): -float(i + k) for i, g in enumerate(groups) for k in range(2)}
    objective = DPOObjective(DPOConfig("sigmoid", beta=0.5, rpo_alpha=0.3))

    def run_on(row_ids: list[int], leaf: torch.Tensor, global_count: int):
        batch = collate([rows[i] for i in row_ids], groups)
        ref = torch.tensor(
            [
                reference[(int(g), int(k))]
                for g, k in zip(batch.response_group_ids, batch.response_indices, strict=True)
            ]
        )
        return objective(batch, leaf[row_ids], global_count, ref), batch

    total = objective.count(collate(rows, groups))
    assert total == 4
    whole, _ = assert_micro_batches_sum_to_whole(
        lambda ids, leaf: run_on(ids, leaf, total)[0], logits, num_rows=3, splits=[[0], [1, 2]]
    )
    assert whole.count == total

    # Independent check: per-pair log-probs read straight from the logits, then the formula.
    expected, chosen_sum = 0.0, 0.0
    for r in range(len(layout)):
        for placement in rows[r].groups:
            g = groups[placement.group_id]
            pc, pr = (
                _naive_logp(logits[r], g.responses[s.response_index], s.start) for s in placement.segments
            )
            rc, rr = reference[(placement.group_id, 0)], reference[(placement.group_id, 1)]
            z = (pc - rc) - (pr - rr)
            expected += softplus(-0.5 * z) + 0.3 * (-pc / len(g.responses[0]))
            chosen_sum += pc
    assert whole.loss.item() == pytest.approx(expected / total, rel=1e-5)
    assert whole.metrics["logps/chosen"].item() == pytest.approx(chosen_sum, rel=1e-5)
    assert whole.metrics["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_dpo_objective_pairs_checks_and_simpo_needs_no_reference() -> None:
    from megatron_prefpack.data.batch import collate
    from megatron_prefpack.losses.objectives import DPOObjective, dpo_pairs

    groups = _groups()
    batch = collate(_rows(groups, [[3, 8], [5], [1]]), groups)
    chosen, rejected = dpo_pairs(batch)
    assert (batch.response_indices[chosen] == 0).all() and (batch.response_indices[rejected] == 1).all()
    assert (batch.response_group_ids[chosen] == batch.response_group_ids[rejected]).all()

    logits = torch.randn(3, ROW, VOCAB)
    with pytest.raises(ValueError, match="needs reference_logps"):
        DPOObjective(DPOConfig("sigmoid"))(batch, logits.clone(), 4)
    with pytest.raises(ValueError, match="global_count"):
        DPOObjective(DPOConfig("simpo"))(batch, logits.clone(), 3)
    out = DPOObjective(DPOConfig("simpo", beta=2.0))(batch, logits.clone(), 4)
    assert out.count == 4 and out.loss.ndim == 0

    from megatron_prefpack.data.layout import build_row

    lone = build_row([(3, groups[3].prompt, [(0, groups[3].responses[0])])], ROW, 0)
    with pytest.raises(ValueError, match=r"groups \[3\] lack a chosen"):
        dpo_pairs(collate([lone], groups))
