"""DPO over groups of K responses (``objective.dpo.ranking``) and the TRL-named DPO metrics.

Every expected number is written out with ``math`` from the formulas (Rafailov et al. 2023's
Plackett-Luce objective; the mean of the pairwise loss over a group's ordered pairs), never
from the implementation. K = 2 with scores ``[1, 0]`` must give ``ranking: pair`` exactly;
ties, one-response groups, packed micro-batches, ``logits/*`` against the full logits, and
tensor/context parallelism (2 gloo processes) against one process.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from megatron_prefpack.data.batch import RowBatch, collate
from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.layout import build_row
from megatron_prefpack.losses.dpo import DPOConfig, ranking_dpo_losses
from megatron_prefpack.losses.objectives import DPO_METRICS, DPOObjective
from tests.distributed import run_distributed
from tests.objective_checks import assert_micro_batches_sum_to_whole, naive_response_stats


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def plackett_luce_by_hand(u: list[float], order: list[int]) -> tuple[float, list[float]]:
    """The PL loss ``sum_k log sum_{j>=k} exp(u_tau(j)) - u_tau(k)`` and its gradient in ``u``."""
    loss, grad = 0.0, [0.0] * len(u)
    for k in range(len(order)):
        rest = order[k:]
        norm = logsumexp([u[j] for j in rest])
        loss += norm - u[order[k]]
        for j in rest:
            grad[j] += math.exp(u[j] - norm)
        grad[order[k]] -= 1.0
    return loss, grad


# Two groups in one batch: group 7 (K=3, best 1 > 2 > 0), group 3 (K=2, response 1 wins).
GROUP_IDS = [7, 7, 7, 3, 3]
SCORES = [0.2, 0.9, 0.5, 0.0, 1.0]
POLICY = [-10.0, -8.0, -9.0, -3.0, -2.0]
REFERENCE = [-9.5, -9.0, -9.0, -3.0, -3.0]
TOKENS = [4, 5, 3, 2, 6]


def run_ranking(config: DPOConfig, policy: list[float] = POLICY, scores: list[float] = SCORES):
    leaf = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
    out = ranking_dpo_losses(
        config,
        leaf,
        torch.tensor(REFERENCE, dtype=torch.float64),
        torch.tensor(TOKENS),
        torch.tensor(GROUP_IDS),
        torch.tensor(scores, dtype=torch.float64),
    )
    out.losses.sum().backward()
    return out, leaf.grad


def test_all_pairs_k3_is_the_mean_pairwise_loss_per_group_plus_rpo_on_the_best() -> None:
    beta, alpha = 0.5, 0.2
    out, _ = run_ranking(DPOConfig("sigmoid", beta=beta, ranking="all_pairs", rpo_alpha=alpha))
    u = [beta * (p - r) for p, r in zip(POLICY, REFERENCE, strict=True)]  # -0.25, 0.5, 0, 0, 0.5
    group_7 = (softplus(-(u[1] - u[0])) + softplus(-(u[1] - u[2])) + softplus(-(u[2] - u[0]))) / 3
    group_3 = softplus(-(u[4] - u[3]))
    nll_7, nll_3 = -POLICY[1] / TOKENS[1], -POLICY[4] / TOKENS[4]  # the best response of each
    # Ranked groups come in ascending id: 3, then 7.
    torch.testing.assert_close(
        out.losses, torch.tensor([group_3 + alpha * nll_3, group_7 + alpha * nll_7], dtype=torch.float64)
    )
    torch.testing.assert_close(out.best_nll, torch.tensor([nll_3, nll_7], dtype=torch.float64))
    torch.testing.assert_close(out.rewards, torch.tensor(u, dtype=torch.float64))

    hinge, _ = run_ranking(DPOConfig("hinge", beta=beta, ranking="all_pairs"))
    hinge_7 = sum(max(0.0, 1 - (u[w] - u[lo])) for w, lo in ((1, 0), (1, 2), (2, 0))) / 3
    torch.testing.assert_close(
        hinge.losses, torch.tensor([max(0.0, 1 - (u[4] - u[3])), hinge_7], dtype=torch.float64)
    )


@pytest.mark.parametrize("length_normalize", [False, True])
def test_plackett_luce_k3_by_hand_with_gradient(length_normalize: bool) -> None:
    beta = 0.5
    config = DPOConfig("sigmoid", beta=beta, ranking="plackett_luce", length_normalize=length_normalize)
    out, grad = run_ranking(config)
    scale = [beta / n if length_normalize else beta for n in TOKENS]
    u = [s * (p - r) for s, p, r in zip(scale, POLICY, REFERENCE, strict=True)]
    loss_7, grad_7 = plackett_luce_by_hand(u[:3], [1, 2, 0])
    loss_3, grad_3 = plackett_luce_by_hand(u[3:], [1, 0])
    assert loss_3 == pytest.approx(softplus(-(u[4] - u[3])))  # K = 2: the DPO sigmoid loss
    torch.testing.assert_close(out.losses, torch.tensor([loss_3, loss_7], dtype=torch.float64))
    expected_grad = [g * s for g, s in zip(grad_7 + grad_3, scale, strict=True)]  # du/dpolicy = scale
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64))
    assert out.best_nll is None


def test_ties_all_pairs_skips_them_plackett_luce_refuses_them() -> None:
    beta = 0.5
    tied = [1.0, 1.0, 0.0, 2.0, 2.0]  # group 7: 0 and 1 tie above 2; group 3: all tied
    out, _ = run_ranking(DPOConfig("sigmoid", beta=beta, ranking="all_pairs", rpo_alpha=1.0), scores=tied)
    u = [beta * (p - r) for p, r in zip(POLICY, REFERENCE, strict=True)]
    # Group 3 has no pair (not a unit); group 7: pairs (0, 2), (1, 2); RPO on both tied best.
    assert out.pairs.group_ids.tolist() == [7]
    best = (-POLICY[0] / TOKENS[0] - POLICY[1] / TOKENS[1]) / 2
    expected = (softplus(-(u[0] - u[2])) + softplus(-(u[1] - u[2]))) / 2 + best
    torch.testing.assert_close(out.losses, torch.tensor([expected], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'plackett_luce' needs a strict order.*groups \[3, 7\]"):
        run_ranking(DPOConfig("sigmoid", beta=beta, ranking="plackett_luce"), scores=tied)


def test_configs_name_the_ranking_key() -> None:
    with pytest.raises(ValueError, match=r"objective\.dpo\.ranking.*one of"):
        DPOConfig(ranking="listwise")
    with pytest.raises(ValueError, match=r"objective\.dpo\.ranking.*'plackett_luce'.*'ipo'"):
        DPOConfig("ipo", ranking="plackett_luce")
    with pytest.raises(ValueError, match=r"objective\.dpo\.ranking.*label_smoothing 0\.1"):
        DPOConfig("sigmoid", label_smoothing=0.1, ranking="plackett_luce")


# --- the objective on packed rows ----------------------------------------------------------

VOCAB = 16
ROW = 32  # a multiple of 2 * CP


def _groups(k3: bool) -> dict[int, TokenizedGroup]:
    """Groups 3, 8, 5, 1: with ``k3`` K = 3 ranked groups (and one K = 1 group), else pairs."""
    rng = np.random.default_rng(0)
    if k3:
        spec = {3: (4, [3, 5, 2], [0.1, 0.7, 0.3]), 8: (2, [6, 2], [0.0, 1.0]), 5: (5, [2, 2, 3], [2, 1, 3])}
        spec[1] = (3, [4], [1.0])  # one response: no pair, no unit
    else:
        spec = {
            g: (p, rs, [1.0, 0.0]) for g, (p, rs) in {3: (4, [3, 5]), 8: (2, [6, 2]), 5: (5, [2, 2])}.items()
        }
        spec[1] = (3, [7, 4], [1.0, 0.0])
    return {
        gid: TokenizedGroup(
            gid, rng.integers(1, VOCAB, p), [rng.integers(1, VOCAB, r) for r in rs], "ranked", scores
        )
        for gid, (p, rs, scores) in spec.items()
    }


def _rows(groups: dict[int, TokenizedGroup]) -> list:
    layout = [[3, 8], [5, 1]]
    return [
        build_row([(g, groups[g].prompt, list(enumerate(groups[g].responses))) for g in gids], ROW, 0)
        for gids in layout
    ]


def _reference(batch: RowBatch) -> torch.Tensor:
    """Fixed reference log-prob sums, by (group, index)."""
    return torch.tensor(
        [
            -3.0 - 0.5 * k - 0.1 * g
            for g, k in zip(batch.response_group_ids.tolist(), batch.response_indices.tolist(), strict=True)
        ]
    )


def _run(objective: DPOObjective, rows: list, groups: dict, leaf: torch.Tensor, ids: list[int], total: int):
    batch = collate([rows[i] for i in ids], groups)
    return objective(batch, leaf[ids], total, _reference(batch))


@pytest.mark.parametrize("ranking", ["all_pairs", "plackett_luce"])
def test_objective_on_packed_k3_rows_by_hand(ranking: str) -> None:
    groups = _groups(k3=True)
    rows = _rows(groups)
    logits = torch.randn(2, ROW, VOCAB, generator=torch.Generator().manual_seed(0))
    beta, alpha = 0.5, 0.3
    objective = DPOObjective(DPOConfig("sigmoid", beta=beta, ranking=ranking, rpo_alpha=alpha))
    total = objective.count(collate(rows, groups))
    assert total == 3  # groups 3, 5, 8; group 1 has one response
    whole, _ = assert_micro_batches_sum_to_whole(
        lambda ids, leaf: _run(objective, rows, groups, leaf, ids, total), logits, 2, [[0], [1]]
    )
    assert set(whole.metrics) == set(objective.metric_keys) == {*DPO_METRICS, "nll_loss"}

    naive = naive_response_stats(logits, rows, groups)
    ref = {(g, k): -3.0 - 0.5 * k - 0.1 * g for g, k in naive}
    loss = accuracy = logits_chosen = nll = 0.0
    for g in (3, 5, 8):
        scores = groups[g].scores
        order = sorted(range(len(scores)), key=lambda k: -scores[k])
        u = [beta * (naive[(g, k)][0] - ref[(g, k)]) for k in range(len(scores))]
        pairs = [(w, lo) for i, w in enumerate(order) for lo in order[i + 1 :]]
        if ranking == "all_pairs":
            loss += sum(softplus(-(u[w] - u[lo])) for w, lo in pairs) / len(pairs)
        else:
            loss += plackett_luce_by_hand(u, order)[0]
        best_nll = -naive[(g, order[0])][0] / naive[(g, order[0])][2]
        loss += alpha * best_nll
        nll += best_nll
        accuracy += sum(u[w] > u[lo] for w, lo in pairs) / len(pairs)
        logits_chosen += sum(naive[(g, w)][1] for w, _ in pairs) / len(pairs)
    assert whole.loss.item() == pytest.approx(loss / total, rel=1e-5)
    assert whole.metrics["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert whole.metrics["rewards/accuracies"].item() == pytest.approx(accuracy)
    assert whole.metrics["logits/chosen"].item() == pytest.approx(logits_chosen, rel=1e-5)
    assert whole.metrics["nll_loss"].item() == pytest.approx(nll, rel=1e-5)


def test_pair_metrics_against_the_full_logits() -> None:
    groups = _groups(k3=False)
    rows = _rows(groups)
    logits = torch.randn(2, ROW, VOCAB, generator=torch.Generator().manual_seed(1))
    beta = 0.5
    objective = DPOObjective(DPOConfig("sigmoid", beta=beta, rpo_alpha=0.1))
    out = _run(objective, rows, groups, logits.clone(), [0, 1], 4)
    naive = naive_response_stats(logits, rows, groups)
    expected = dict.fromkeys((*DPO_METRICS[1:], "nll_loss"), 0.0)
    for g in (1, 3, 5, 8):
        (pc, lc, nc), (pr, lr, _) = naive[(g, 0)], naive[(g, 1)]
        rc, rr = beta * (pc + 3.0 + 0.1 * g), beta * (pr + 3.5 + 0.1 * g)
        for key, value in {
            "rewards/chosen": rc,
            "rewards/rejected": rr,
            "rewards/accuracies": float(rc > rr),
            "rewards/margins": rc - rr,
            "logps/chosen": pc,
            "logps/rejected": pr,
            "logits/chosen": lc,
            "logits/rejected": lr,
            "nll_loss": -pc / nc,
        }.items():
            expected[key] += value
    for key, value in expected.items():
        assert out.metrics[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


LOSS_TYPES = [
    DPOConfig("sigmoid", beta=0.5, rpo_alpha=0.3),
    DPOConfig("sigmoid", beta=0.5, label_smoothing=0.1),
    DPOConfig("robust", beta=0.5, label_smoothing=0.2),
    DPOConfig("hinge", beta=0.5),
    DPOConfig("ipo", beta=0.5),
    DPOConfig("simpo", beta=2.0, rpo_alpha=0.1),
]


def _objective_result(config: DPOConfig, logits: torch.Tensor, rows: list, groups: dict):
    objective = DPOObjective(config)
    leaf = logits.clone().requires_grad_(True)
    batch = collate(rows, groups)
    total = objective.count(batch)
    out = objective(batch, leaf * 1, total, _reference(batch))
    out.loss.backward()
    return out, leaf.grad


@pytest.mark.parametrize(
    "config", LOSS_TYPES, ids=lambda c: f"{c.loss_type}-{c.label_smoothing}-{c.rpo_alpha}"
)
def test_k2_all_pairs_and_plackett_luce_equal_pair(config: DPOConfig) -> None:
    groups = _groups(k3=False)
    rows = _rows(groups)
    logits = torch.randn(2, ROW, VOCAB, generator=torch.Generator().manual_seed(2))
    pair, pair_grad = _objective_result(config, logits, rows, groups)
    assert pair.count == 4
    forms = ["all_pairs"] + (
        ["plackett_luce"] if config.loss_type == "sigmoid" and not config.label_smoothing else []
    )
    for ranking in forms:
        ranked, ranked_grad = _objective_result(
            dataclasses.replace(config, ranking=ranking), logits, rows, groups
        )
        assert ranked.count == pair.count
        torch.testing.assert_close(ranked.loss, pair.loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(ranked_grad, pair_grad, rtol=1e-5, atol=1e-9)
        assert ranked.metrics.keys() == pair.metrics.keys()
        for key, value in pair.metrics.items():
            torch.testing.assert_close(ranked.metrics[key], value, rtol=1e-6, atol=1e-7, msg=key)


# --- tensor and context parallelism --------------------------------------------------------


def _parallel_worker(layout: str, config: DPOConfig, logits: torch.Tensor, rows: list, groups: dict) -> dict:
    """One rank of TP2 (its vocabulary shard) or CP2 (its share of the rows' tokens)."""
    from megatron.core import parallel_state

    from megatron_prefpack.attention import shard_for_cp
    from megatron_prefpack.models.forward import cp_local
    from megatron_prefpack.platform.distributed import initialize

    initialize(**{"tensor_parallel" if layout == "tp2" else "context_parallel": 2})
    batch = collate(rows, groups)
    if layout == "tp2":
        rank = parallel_state.get_tensor_model_parallel_rank()
        local, cp_group = logits.chunk(2, dim=-1)[rank], None
    else:
        rank = parallel_state.get_context_parallel_rank()
        local, cp_group = shard_for_cp(logits, 1, 2, rank), parallel_state.get_context_parallel_group()
        batch = cp_local(batch)
    objective = DPOObjective(config, cp_group=cp_group)
    leaf = local.clone().requires_grad_(True)
    out = objective(batch, leaf * 1, objective.count(batch), _reference(batch))
    out.loss.backward()
    return {"loss": out.loss.detach(), "metrics": out.metrics, "grad": leaf.grad, "rank": rank}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "cp2"])
@pytest.mark.parametrize(
    "config",
    [
        DPOConfig("sigmoid", beta=0.5, ranking="plackett_luce", rpo_alpha=0.3),
        DPOConfig("ipo", beta=0.5, ranking="all_pairs"),
    ],
    ids=lambda c: c.ranking,
)
def test_parallel_layouts_equal_one_process(layout: str, config: DPOConfig) -> None:
    from megatron_prefpack.attention.context_parallel import cp_positions

    groups = _groups(k3=True)
    rows = _rows(groups)
    logits = torch.randn(2, ROW, VOCAB, generator=torch.Generator().manual_seed(3))
    single, single_grad = _objective_result(config, logits, rows, groups)
    ranks = sorted(
        run_distributed(_parallel_worker, 2, layout, config, logits, rows, groups), key=lambda r: r["rank"]
    )
    grad = torch.zeros_like(logits)
    for r in ranks:
        torch.testing.assert_close(r["loss"], single.loss.detach(), rtol=1e-5, atol=1e-7)
        for key, value in single.metrics.items():
            torch.testing.assert_close(r["metrics"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        if layout == "tp2":
            grad[..., r["rank"] * VOCAB // 2 : (r["rank"] + 1) * VOCAB // 2] = r["grad"]
        else:
            grad[:, cp_positions(ROW, 2, r["rank"])] = r["grad"]
    torch.testing.assert_close(grad, single_grad, rtol=1e-5, atol=1e-7)


# --- the trainer: which datasets each ranking accepts, and a run --------------------------

TRAIN_VOCAB = 96  # the tiny presets' vocabulary


def _write_dataset(directory, kinds: list[tuple[str, list[float] | None]], seed: int = 0):
    """Groups of K = len(scores) responses (``multi``: 2, no scores), prompts of 2-6 tokens."""
    from megatron_prefpack.data.group_dataset import GroupDataset, GroupDatasetWriter

    rng = np.random.default_rng(seed)
    with GroupDatasetWriter(directory, TRAIN_VOCAB) as writer:
        for i, (kind, scores) in enumerate(kinds):
            prompt = rng.integers(4, TRAIN_VOCAB, rng.integers(2, 7)).astype(np.int32)
            k = 2 if scores is None else len(scores)
            responses = [
                np.append(rng.integers(4, TRAIN_VOCAB, rng.integers(1, 6)), 2).astype(np.int32)
                for _ in range(k)
            ]
            writer.add(TokenizedGroup(i, prompt, responses, kind, scores), line=i + 1)
        writer.finalize({"tokenizer": {"pad_id": 0}})
    return GroupDataset(directory)


def test_each_ranking_refuses_the_groups_it_cannot_train(tmp_path) -> None:
    from megatron_prefpack.training.data import groups_without_preference

    dataset = _write_dataset(
        tmp_path / "ds",
        [
            ("pair", [1.0, 0.0]),
            ("ranked", [0.1, 0.9, 0.5]),  # response 0 is not the best: no 'pair' preference
            ("ranked", [2.0, 1.0, 1.0]),  # a tie below the top
            ("multi", None),  # SFT targets: no scores
            ("ranked", [3.0]),  # one response
        ],
    )
    assert groups_without_preference(dataset, "pair").tolist() == [1, 3, 4]
    assert groups_without_preference(dataset, "all_pairs").tolist() == [3]
    assert groups_without_preference(dataset, "plackett_luce").tolist() == [2, 3]

    from megatron_prefpack.training.config import ConfigError, read_config
    from megatron_prefpack.training.data import _check_preferences

    base = ["model.preset=tiny-dense", f"data.path={tmp_path / 'ds'}"]
    cfg = read_config(None, [*base, "objective.dpo.ranking=plackett_luce"])
    with pytest.raises(
        ConfigError,
        match=r"objective\.dpo\.ranking: .*2 of 5 groups have none or tied.*source lines \[3, 4\]",
    ):
        _check_preferences(cfg, dataset)
    with pytest.raises(
        ConfigError, match=r"objective\.type: dpo trains each group's response 0.*3 of 5 groups"
    ):
        _check_preferences(read_config(None, base), dataset)


def _train(args: list[str]) -> list[dict]:
    from megatron_prefpack.training.config import load_config
    from megatron_prefpack.training.train import train

    return train(load_config(None, args)).history


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ranking", "first_loss"), [("all_pairs", math.log(2)), ("plackett_luce", math.log(6))]
)
def test_prefpack_train_on_three_response_groups(ranking: str, first_loss: float, tmp_path) -> None:
    """The policy starts as its (online) reference, so every implicit reward is 0: a group's
    all-pairs loss is log 2 and its Plackett-Luce loss log 3 + log 2 = log 3!."""
    rng = np.random.default_rng(1)
    _write_dataset(
        tmp_path / "ds", [("ranked", rng.permutation(3).astype(float).tolist()) for _ in range(24)]
    )
    args = [
        f"data.path={tmp_path / 'ds'}",
        f"run.dir={tmp_path / 'run'}",
        "run.tensorboard=false",
        "data.seq_len=64",
        "data.micro_batch_size=2",
        "data.global_batch_size=4",
        "model.preset=tiny-dense",
        "objective.type=dpo",
        f"objective.dpo.ranking={ranking}",
        "objective.dpo.rpo_alpha=0.0",
        "reference.mode=online",
        "optimizer.lr=1e-2",
        "run.train_steps=2",
    ]
    history = run_distributed(_train, 1, args, timeout=240)[0]
    assert history[0]["loss"] == pytest.approx(first_loss, abs=1e-5)
    assert history[0]["rewards/accuracies"] == 0.0 and history[0]["rewards/margins"] == pytest.approx(
        0, abs=1e-6
    )
    assert history[0]["nll_loss"] > 0 and all(math.isfinite(h["logits/chosen"]) for h in history)
