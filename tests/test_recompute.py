"""Megatron's activation recompute (``performance.recompute_*``) is exact with the prefix-shared
models on CPU (fp32), under megatron-core 0.16.1 and 0.19.2.

- every full (``uniform`` / ``block``, 1 and 2 layers) and selective (``core_attn``,
  ``mla_up_proj``, ``mlp``, ``moe``, ``shared_experts``, ``layernorm``) setting gives, on
  preference-packed rows with several groups and responses, the loss, the gradients (MoE aux
  loss included) and the expert-bias load counts of the run without recompute: bit for bit,
  except ``layernorm`` (same to float rounding: its gradient reaches the residual stream in
  another summation order). A dense Llama-3 model (standard RoPE following the position ids),
  an MoE model and the A.X K1-shaped MLA model (RoPE inside the attention, YaRN, expert bias,
  shared expert);
- each run really recomputed: the re-runs are counted (one per checkpointed chunk/module);
- the same with the varlen attention backend (its CPU loop kernel) instead of the reference one;
- pipeline parallelism (PP2, uneven stages) with full recompute gives the single process's loss,
  gradients and load counts;
- ``prefpack train``: DPO with full recompute writes the losses of the run without it;
- ``moe_act`` (grouped GEMM, GPU only) is refused by ``load_config`` naming the key.

Two megatron-core 0.16.1 bugs, fixed in 0.19, are pinned as strict xfails: ``uniform`` with a
chunk that does not divide the stage's layers indexes past the last layer, and ``block`` runs
the layers after its window without the padding mask (pad tokens enter their MoE aux loss and
expert-bias counts).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import fill_params_by_key, run_distributed
from tests.test_model_equivalence import build, make_batch, make_groups, model_config, response_token_logprobs

MCORE_BEFORE_017 = tuple(int(p) for p in importlib.metadata.version("megatron-core").split(".")[:2]) < (0, 17)

FULL = {
    f"full-{method}-{n}": dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=n)
    for method in ("uniform", "block")
    for n in (1, 2)
}
SELECTIVE = ("core_attn", "mla_up_proj", "mlp", "moe", "shared_experts", "layernorm")
MODELS = ("tiny-llama3", "tiny-moe", "tiny-mla-moe")


def _settings(mode: str) -> dict[str, Any]:
    """TransformerConfig recompute keywords for a mode name (``full-uniform-1``, ``core_attn``, ...)."""
    return FULL[mode] if mode in FULL else dict(recompute_granularity="selective", recompute_modules=[mode])


def _applies(name: str, mode: str) -> bool:
    """Whether Megatron recomputes anything for ``mode`` in this model (the config refuses the rest)."""
    cfg = model_config(name)
    return {
        "mla_up_proj": cfg.mla is not None,
        "moe": cfg.moe is not None,
        "shared_experts": cfg.moe is not None and bool(cfg.moe.shared_expert_ffn_hidden_size),
        "mlp": cfg.moe is None or bool(cfg.moe.first_k_dense or cfg.moe.dense_layers),
    }.get(mode, True)


def _mcore016_bug(name: str, mode: str) -> str | None:
    """Why megatron-core 0.16.1 gets ``mode`` wrong for ``name`` (None: it does not)."""
    if mode not in FULL:
        return None
    cfg = model_config(name)
    n = FULL[mode]["recompute_num_layers"]
    if mode.startswith("full-uniform") and cfg.num_layers % n:
        return "0.16 full/uniform: a last chunk shorter than recompute_num_layers indexes past the last layer"
    if mode.startswith("full-block") and n < cfg.num_layers and cfg.moe is not None:
        return "0.16 full/block: layers after the window run without padding_mask (pads in MoE statistics)"
    return None


def _cases() -> Iterator[Any]:
    for name in MODELS:
        for mode in (*FULL, *SELECTIVE):
            if not _applies(name, mode):
                continue
            bug = _mcore016_bug(name, mode)
            marks = [pytest.mark.xfail(MCORE_BEFORE_017, reason=bug, strict=True)] if bug else []
            yield pytest.param(name, mode, marks=marks, id=f"{name}-{mode}")


@dataclasses.dataclass
class Run:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    load_counts: list[torch.Tensor]
    reruns: Counter
    layer_kinds: list[str]
    """``"moe"`` or ``"dense"`` per layer."""


def _routers(model: torch.nn.Module) -> list[Any]:
    return [layer.mlp.router for layer in model.decoder.layers if layer.is_moe_layer]


def _count_reruns(set_attribute: Callable[[Any, str, Any], None]) -> Counter:
    """A counter of how often Megatron re-runs a checkpointed function from now on:
    ``checkpoint`` (``tensor_parallel.checkpoint``), ``without_output`` (``CheckpointWithoutOutput``).
    ``set_attribute``: ``setattr``, or ``monkeypatch.setattr`` to undo it after the test."""
    from megatron.core.tensor_parallel import random as mcore_random

    counter: Counter = Counter()
    backward = mcore_random.CheckpointFunction.backward
    recompute = mcore_random.CheckpointWithoutOutput._recompute

    def counted_backward(ctx: Any, *grads: Any) -> Any:
        counter["checkpoint"] += 1
        return backward(ctx, *grads)

    def counted_recompute(self: Any, grad: Any) -> Any:
        counter["without_output"] += self.ctx is not None  # a later hook call is a no-op
        return recompute(self, grad)

    set_attribute(mcore_random.CheckpointFunction, "backward", staticmethod(counted_backward))
    set_attribute(mcore_random.CheckpointWithoutOutput, "_recompute", counted_recompute)
    return counter


@pytest.fixture
def reruns(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """:func:`_count_reruns` for the duration of the test."""
    return _count_reruns(monkeypatch.setattr)


def _run(name: str, settings: dict[str, Any], reruns: Counter, backend: str = "auto") -> Run:
    """Loss = sum of every response's log-probs over packed rows (plus the MoE aux loss in
    backward), one training forward and backward with attention ``backend``; ``reruns``: the
    fixture's counter."""
    from megatron_prefpack.models.forward import model_forward

    reruns.clear()
    cfg, model = build(name, transformer_overrides=settings, attention_backend=backend)
    model.train()
    groups = make_groups(seed=2, vocab_size=cfg.vocab_size, num_groups=4)
    batch = make_batch(groups, "packed")
    assert max(len(p) for p in batch.placements) > 1 and (batch.doc_ids == -1).any()
    loss = sum(
        lp.sum()
        for lp in response_token_logprobs(model_forward(model, batch, backend=backend), batch).values()
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counts = [r.local_tokens_per_expert.clone() for r in _routers(model) if r.enable_expert_bias]
    kinds = ["moe" if layer.is_moe_layer else "dense" for layer in model.decoder.layers]
    return Run(loss.detach(), grads, counts, Counter(reruns), kinds)


def _expected_reruns(kinds: list[str], mode: str) -> Counter:
    """Re-runs Megatron makes for ``mode`` in layers of ``kinds``: one per checkpointed chunk or module."""
    layers = len(kinds)
    if mode in FULL:
        n = FULL[mode]["recompute_num_layers"]
        chunks = math.ceil(layers / n) if "uniform" in mode else min(n, layers)
        return Counter(checkpoint=chunks)
    per_module = {
        "core_attn": Counter(checkpoint=layers),
        "mlp": Counter(checkpoint=kinds.count("dense")),
        "moe": Counter(checkpoint=kinds.count("moe")),
        "shared_experts": Counter(checkpoint=kinds.count("moe")),
        "mla_up_proj": Counter(without_output=layers),
        "layernorm": Counter(without_output=2 * layers),  # input and pre-MLP norm
    }
    return per_module[mode]


_REFERENCE: dict[str, Run] = {}


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize(("name", "mode"), list(_cases()))
def test_recompute_gives_the_same_loss_and_gradients(name: str, mode: str, reruns: Counter) -> None:
    if name not in _REFERENCE:
        _REFERENCE[name] = _run(name, {}, reruns)
    ref = _REFERENCE[name]
    assert not ref.reruns
    got = _run(name, _settings(mode), reruns)
    assert got.reruns == _expected_reruns(got.layer_kinds, mode)
    _assert_same(got, ref, exact=mode != "layernorm")


def _assert_same(got: Run, ref: Run, exact: bool = True) -> None:
    """Same loss and load counts; gradients bit for bit or (``exact=False``) to float rounding."""
    assert torch.equal(got.loss, ref.loss)
    assert got.grads.keys() == ref.grads.keys() and ref.grads
    for pname, expected in ref.grads.items():
        if exact:
            assert torch.equal(got.grads[pname], expected), (
                f"{pname}: {(got.grads[pname] - expected).abs().max()}"
            )
        else:
            torch.testing.assert_close(
                got.grads[pname], expected, rtol=1e-5, atol=1e-6 * expected.abs().max()
            )
    assert len(got.load_counts) == len(ref.load_counts)
    for counts, expected in zip(got.load_counts, ref.load_counts, strict=True):
        assert torch.equal(counts, expected)


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("mode", ["core_attn", "full-uniform-1"])
def test_recompute_with_the_varlen_backend(mode: str, reruns: Counter) -> None:
    """The varlen backend's plan (per-segment index lists; its loop kernel on CPU) serves the
    re-run as it served the forward."""
    ref = _run("tiny-mla-moe", {}, reruns, backend="varlen")
    got = _run("tiny-mla-moe", _settings(mode), reruns, backend="varlen")
    assert got.reruns == _expected_reruns(got.layer_kinds, mode)
    _assert_same(got, ref)


# --- pipeline parallelism with full recompute vs one process ------------------------------------

PP_MODEL = "tiny-mla-moe"
PP_LAYOUT = {"pipeline_parallel": 2}
PP_OVERRIDES = {"num_layers_in_first_pipeline_stage": 1}  # the dense first layer alone on stage 0


def _global_name(model: torch.nn.Module, name: str) -> str:
    """``decoder.layers.<local>.x`` -> ``decoder.layers.<global>.x`` (this stage's layer offset)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _schedule_loss_and_grads(layout: dict[str, int], transformer_overrides: dict[str, Any]) -> dict:
    """One rank: same weights on any layout (``fill_params_by_key``), one training forward and
    backward through Megatron's schedule; this stage's gradients and load counts by global name."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prefpack.models.forward import model_forward
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(**layout)
    cfg, model = build(PP_MODEL, transformer_overrides)
    fill_params_by_key(model, seed=3)
    model.train()
    batch = make_batch(make_groups(seed=5, vocab_size=cfg.vocab_size), "packed")

    def forward_step(data_iterator: Any, chunk: torch.nn.Module):
        output = model_forward(chunk, next(data_iterator))

        def loss_func(logits: torch.Tensor):
            loss = sum(lp.sum() for lp in response_token_logprobs(logits, batch).values())
            return loss, {"loss": loss.detach()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=batch.tokens.shape[1],
        micro_batch_size=batch.tokens.shape[0],
        forward_only=False,
    )
    return {
        "loss": losses[0]["loss"] if parallel_state.is_pipeline_last_stage() else None,
        "grads": {_global_name(model, n): p.grad for n, p in model.named_parameters() if p.grad is not None},
        "counts": {
            layer.layer_number: layer.mlp.router.local_tokens_per_expert
            for layer in model.decoder.layers
            if layer.is_moe_layer
        },
    }


@pytest.mark.slow
def test_pipeline_parallel_full_recompute_matches_one_process() -> None:
    (single,) = run_distributed(_schedule_loss_and_grads, 1, {}, {})
    ranks = run_distributed(
        _schedule_loss_and_grads, 2, PP_LAYOUT, {**PP_OVERRIDES, **FULL["full-uniform-1"]}
    )
    assert torch.equal(ranks[1]["loss"], single["loss"])
    grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    counts = {**ranks[0]["counts"], **ranks[1]["counts"]}
    assert grads.keys() == single["grads"].keys() and counts.keys() == single["counts"].keys()
    for pname, expected in single["grads"].items():
        assert torch.equal(grads[pname], expected), f"{pname}: {(grads[pname] - expected).abs().max()}"
    for layer, expected in single["counts"].items():
        assert torch.equal(counts[layer], expected) and expected.sum() > 0


# --- prefpack train ------------------------------------------------------------------------------


def _train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if record["split"] == "train"]


def _train_counting_reruns(args: list[str]) -> dict:
    """Rank body: ``tests.test_train._train`` plus the re-runs of :func:`_count_reruns`."""
    from tests.test_train import _train

    reruns = _count_reruns(setattr)  # this rank process only
    return {**_train(args), "reruns": dict(reruns)}


@pytest.mark.slow
def test_dpo_training_with_full_recompute_writes_the_same_losses(tmp_path: Path) -> None:
    """A.X K1-shaped model (MLA, expert bias: the load counts steer the next steps' routing);
    3 steps of one micro-batch, each recomputing its 3 layers one by one."""
    from tests.test_train import make_dataset, overrides

    data = make_dataset(tmp_path / "ds", num_groups=16)
    common = [
        "model.preset=tiny-mla-moe",
        "run.train_steps=3",
        "run.log_interval=1",
        "data.micro_batch_size=4",
    ]
    recompute = [
        "performance.recompute_granularity=full",
        "performance.recompute_method=uniform",
        "performance.recompute_num_layers=1",
    ]
    plain = run_distributed(_train_counting_reruns, 1, overrides(data, tmp_path / "plain", *common))[0]
    again = run_distributed(
        _train_counting_reruns, 1, overrides(data, tmp_path / "recompute", *common, *recompute)
    )[0]
    assert (plain["reruns"], again["reruns"]) == ({}, {"checkpoint": 3 * 3})
    losses = _train_losses(tmp_path / "plain")
    assert len(losses) == 3 and losses[-1] != losses[0]
    assert _train_losses(tmp_path / "recompute") == losses
    assert again["grad_norm"] == plain["grad_norm"]


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "performance.recompute_modules: 'moe_act' needs performance.moe_grouped_gemm: true"),
        pytest.param(
            ["performance.moe_grouped_gemm=true"],
            "performance.moe_grouped_gemm: needs a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused on machines without a GPU"),
            id="grouped-gemm",
        ),
    ],
)
def test_moe_act_recompute_is_refused_without_a_gpu(tmp_path: Path, extra: list[str], message: str) -> None:
    from megatron_prefpack.training.config import ConfigError, load_config
    from tests.test_train import make_dataset, overrides

    data = make_dataset(tmp_path / "ds", num_groups=2)
    args = overrides(
        data,
        tmp_path / "run",
        "performance.recompute_granularity=selective",
        "performance.recompute_modules=[moe_act]",
        *extra,
    )
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, args)
