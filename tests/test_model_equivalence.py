"""The packing invariant on one process (fp32, CPU): per-token log-probs of every response in a
row equal those of prompt + response run alone through the same model, for dense, MoE and
A.X K1-like MLA-MoE models and the Hugging Face architectures' features (llama3 RoPE, q/k norm,
tied embeddings, MoE layers by index, partial rotary with Q/K/V bias), in preference-packed,
duplicated-prompt and unpacked rows; gradients too. Also: RoPE really follows the position ids (the check fails with 0..S-1 positions) and pad
tokens stay out of MoE routing statistics.

The helpers here are reused by ``test_model_parallel_equivalence.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from megatron_prefpack.data.batch import RowBatch, collate
from megatron_prefpack.data.groups import TokenizedGroup
from megatron_prefpack.data.layout import NO_RESPONSE, PackedRow, build_row
from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.presets import preset

PAD_ID = 0
ROW_LENGTH = 64
LAYOUTS = ("packed", "duplicated", "unpacked")


def model_config(name: str) -> ModelConfig:
    """Test models: the tiny presets, plus tiny-dense with learned absolute positions."""
    if name == "tiny-dense-learned":
        return dataclasses.replace(preset("tiny-dense"), position_embedding="learned", name=name)
    return preset(name)


MODEL_NAMES = (
    "tiny-dense",
    "tiny-dense-learned",
    "tiny-moe",
    "tiny-mla-moe",
    "tiny-llama3",
    "tiny-qwen3",
    "tiny-qwen3-moe",
    "tiny-glm4-moe",
)


def make_groups(seed: int, vocab_size: int, num_groups: int = 5) -> list[TokenizedGroup]:
    """Random groups with K = 2-3 responses; token ids avoid ``PAD_ID``."""
    rng = np.random.default_rng(seed)
    groups = []
    for gid in range(num_groups):
        prompt = rng.integers(1, vocab_size, rng.integers(3, 10))
        responses = [rng.integers(1, vocab_size, rng.integers(2, 7)) for _ in range(rng.integers(2, 4))]
        groups.append(TokenizedGroup(gid, prompt, responses, kind="multi"))
    return groups


def _fill_rows(placements: list, row_length: int) -> list[PackedRow]:
    """Greedily fill rows of ``row_length`` with placements in order (pad tail)."""
    rows, current, used = [], [], 0
    for placement in placements:
        _, prompt, responses = placement
        need = len(prompt) - 1 + sum(1 + len(r) for _, r in responses)
        if current and used + need > row_length:
            rows.append(build_row(current, row_length, PAD_ID))
            current, used = [], 0
        current.append(placement)
        used += need
    rows.append(build_row(current, row_length, PAD_ID))
    return rows


def layout_rows(groups: list[TokenizedGroup], layout: str, row_length: int = ROW_LENGTH) -> list[PackedRow]:
    """Rows of the given layout, all built with ``layout.build_row``."""
    if layout == "packed":
        placements = [(g.group_id, g.prompt, list(enumerate(g.responses))) for g in groups]
        return _fill_rows(placements, row_length)
    singles = [(g.group_id, g.prompt, [(k, r)]) for g in groups for k, r in enumerate(g.responses)]
    if layout == "duplicated":
        return _fill_rows(singles, row_length)
    if layout == "unpacked":
        return [build_row([s], row_length, PAD_ID) for s in singles]
    raise ValueError(layout)


def make_batch(groups: list[TokenizedGroup], layout: str, row_length: int = ROW_LENGTH) -> RowBatch:
    return collate(layout_rows(groups, layout, row_length), {g.group_id: g for g in groups})


def single_batch(group: TokenizedGroup, k: int) -> RowBatch:
    """Prompt + response ``k`` alone in a row of exactly its length."""
    response = group.responses[k]
    row = build_row(
        [(group.group_id, group.prompt, [(k, response)])], len(group.prompt) + len(response), PAD_ID
    )
    return collate([row], {group.group_id: group})


def response_token_logprobs(logits: torch.Tensor, batch: RowBatch) -> dict[tuple[int, int], torch.Tensor]:
    """Per-token log-probs of each response, keyed ``(group_id, response_index)``, in token order.

    ``logits``: ``(B, S, V / TP)`` vocab-parallel (collective over TP when initialized).
    """
    from megatron_prefpack.losses.logprobs import token_logprobs

    logps = token_logprobs(logits.float(), batch.labels)
    out = {}
    for n in range(batch.num_responses):
        key = (int(batch.response_group_ids[n]), int(batch.response_indices[n]))
        out[key] = logps[batch.response_slots == n]
    return out


def single_token_logprobs(model: torch.nn.Module, group: TokenizedGroup, k: int) -> torch.Tensor:
    """Log-probs of response ``k``'s tokens with prompt + response run alone (no padding)."""
    from megatron_prefpack.models.forward import model_forward

    batch = single_batch(group, k)
    return response_token_logprobs(model_forward(model, batch), batch)[(group.group_id, k)]


def build(
    name: str, transformer_overrides: dict[str, Any] | None = None, **changes
) -> tuple[ModelConfig, torch.nn.Module]:
    """Preset ``name`` with ``changes``, built for the initialized parallel layout;
    ``transformer_overrides`` go to Megatron's TransformerConfig (e.g. uneven pipeline stages)."""
    from megatron_prefpack.models.builder import build_model, parallel_layout
    from megatron_prefpack.models.config import to_transformer_config

    cfg = model_config(name)
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    torch.manual_seed(0)
    tcfg = to_transformer_config(cfg, **parallel_layout(), **(transformer_overrides or {}))
    return cfg, build_model(cfg, tcfg)


def _assert_logprobs_match(packed: dict, reference: dict, tol: float = 1e-5) -> None:
    assert packed.keys() == reference.keys()
    for key, ref in reference.items():
        assert packed[key].shape == ref.shape, key
        diff = (packed[key] - ref).abs().max().item()
        assert diff <= tol, f"response {key}: max |diff| {diff:.3g} > {tol}"


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_layout_matches_responses_run_alone(name: str) -> None:
    from megatron_prefpack.models.forward import model_forward

    cfg, model = build(name)
    groups = make_groups(seed=1, vocab_size=cfg.vocab_size)
    model.eval()
    with torch.no_grad():
        reference = {
            (g.group_id, k): single_token_logprobs(model, g, k)
            for g in groups
            for k in range(len(g.responses))
        }
        for layout in LAYOUTS:
            batch = make_batch(groups, layout)
            if layout == "packed":
                assert batch.tokens.shape[0] > 1 and (batch.doc_ids == -1).any(), (
                    "want several rows and a pad tail"
                )
                assert max(len(p) for p in batch.placements) > 1, "want several groups in a row"
            _assert_logprobs_match(response_token_logprobs(model_forward(model, batch), batch), reference)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("name", ("tiny-dense", "tiny-moe", "tiny-mla-moe", "tiny-qwen3", "tiny-glm4-moe"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_responses_run_alone(name: str, layout: str) -> None:
    """d(sum of response log-probs)/d(params), packed vs alone. The MoE aux loss is switched off:
    it depends on the batch's composition by design (compare log-probs, not aux losses)."""
    from megatron_prefpack.models.forward import model_forward

    moe = dataclasses.replace(model_config(name).moe, aux_loss_coeff=0.0) if model_config(name).moe else None
    cfg, model = build(name, moe=moe)
    groups = make_groups(seed=2, vocab_size=cfg.vocab_size, num_groups=3)
    batch = make_batch(groups, layout)
    sum(lp.sum() for lp in response_token_logprobs(model_forward(model, batch), batch).values()).backward()
    packed = _grads(model)
    for g in groups:
        for k in range(len(g.responses)):
            single_token_logprobs(model, g, k).sum().backward()
    alone = _grads(model)
    assert packed.keys() == alone.keys() and packed
    for pname, ref in alone.items():
        rel = ((packed[pname] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, f"{pname}: relative grad diff {rel:.3g}"


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("name", ("tiny-dense", "tiny-mla-moe", "tiny-llama3", "tiny-glm4-moe"))
def test_rope_from_row_positions_fails_the_check(name: str) -> None:
    """With RoPE from 0..S-1 (what GPTModel/MLA do by default), the first response of a row's first
    group still matches (its positions are 0..S-1) but the second does not: the check can fail.
    Larger init so attention is far from uniform and positions visibly matter."""
    from megatron_prefpack.models.forward import model_forward

    cfg, model = build(name, init_method_std=0.3)
    group = make_groups(seed=3, vocab_size=cfg.vocab_size, num_groups=1)[0]
    batch = make_batch([group], "packed")
    row_positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.position_ids).contiguous()
    wrong = dataclasses.replace(batch, position_ids=row_positions)
    model.eval()
    with torch.no_grad():
        logps = response_token_logprobs(model_forward(model, wrong), wrong)
        first, second = (single_token_logprobs(model, group, k) for k in (0, 1))
    assert (logps[(0, 0)] - first).abs().max() <= 1e-5
    assert (logps[(0, 1)] - second).abs().max() > 1e-3


def _moe_metrics() -> dict:
    """Megatron's per-layer MoE loss records, ``name -> (num_layers,) tensor`` holder (mutable)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker  # megatron-core >= 0.17
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return get_moe_layer_wise_logging_tracker()
    return get_moe_metrics_tracker().metrics


def _load_balancing_losses() -> torch.Tensor:
    entry = _moe_metrics()["load_balancing_loss"]
    return (entry["values"] if isinstance(entry, dict) else entry.values).clone()


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("name", ("tiny-moe", "tiny-mla-moe"))
def test_pad_tokens_stay_out_of_routing(name: str) -> None:
    """A row with a pad tail routes its real tokens, computes the aux loss and (tiny-mla-moe)
    counts expert load for the expert bias exactly as the same tokens without padding; without
    the padding mask it would not."""
    from megatron_prefpack.attention import PrefPackSeqParams
    from megatron_prefpack.models.forward import model_forward

    moe = dataclasses.replace(model_config(name).moe, aux_loss_coeff=1e-2)
    cfg, model = build(name, moe=moe)
    group = make_groups(seed=4, vocab_size=cfg.vocab_size, num_groups=1)[0]
    real = make_batch([group], "packed", row_length=group.num_tokens)
    padded = make_batch([group], "packed", row_length=group.num_tokens + 16)
    routers = [layer.mlp.router for layer in model.decoder.layers if layer.is_moe_layer]

    def run(batch: RowBatch, masked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        _moe_metrics().clear()  # forget sizes too: the tests build models of different depth
        if cfg.moe.expert_bias:
            for router in routers:
                router.local_tokens_per_expert.zero_()
        if masked:
            logits = model_forward(model, batch)
        else:  # what Megatron gets without model_forward's padding mask
            params = PrefPackSeqParams.from_batch(batch)
            logits = model(batch.tokens, batch.position_ids, None, packed_seq_params=params)
        counts = (
            torch.stack([router.local_tokens_per_expert.clone() for router in routers])
            if cfg.moe.expert_bias
            else None
        )
        return logits[:, : group.num_tokens].detach(), _load_balancing_losses(), counts

    model.train()
    ref_logits, ref_aux, ref_counts = run(real, masked=True)
    logits, aux, counts = run(padded, masked=True)
    _, unmasked_aux, unmasked_counts = run(padded, masked=False)
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.allclose(aux, ref_aux, rtol=1e-6, atol=0)
    assert not torch.allclose(unmasked_aux, ref_aux, rtol=1e-6, atol=0)
    if cfg.moe.expert_bias:
        assert torch.equal(counts, ref_counts)
        assert counts.sum() == len(routers) * group.num_tokens * cfg.moe.top_k
        assert not torch.equal(unmasked_counts, ref_counts)


def test_response_slots_cover_every_response_token() -> None:
    """The fixtures exercise what the equivalence tests claim: every response token is compared."""
    groups = make_groups(seed=1, vocab_size=96)
    for layout in LAYOUTS:
        batch = make_batch(groups, layout)
        assert batch.num_responses == sum(len(g.responses) for g in groups)
        assert int((batch.response_slots != NO_RESPONSE).sum()) == sum(
            len(r) for g in groups for r in g.responses
        )
