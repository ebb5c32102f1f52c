"""DeepSeek-V3, Llama (``llama3`` RoPE), Qwen3 (q/k norms, tied embeddings), Qwen3-MoE (``norm_topk_prob``
true and false, a dense layer from ``mlp_only_layers``) and GLM-4.5 (Q/K/V bias, half-rotary
RoPE, q/k norms, grouped sigmoid routing with correction bias) against transformers.

Each tiny random model is saved with ``save_pretrained``; its ``config.json`` must read as the
expected :class:`ModelConfig` and its generated ``config.json`` back; its weights are imported
into this package's model (packed log-probs equal transformers on each prompt + response alone,
<= 1e-5) and exported from it again (the same tensors, bit for bit). Through the command-line
tools: imported, every weight changed (as training would), exported with the source config and
with a generated one, each loaded by ``AutoModelForCausalLM`` gives this package's log-probs; a
Qwen3 reward model exports as ``Qwen3ForSequenceClassification`` with equal rewards.

The tool and checkpoint helpers here are shared with ``tests/test_hf_export.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.hf_checks import assert_close, hf_logprobs, packed_logprobs, randomize, read_tensors
from tests.test_hf_reference import deepseek_v3_shaped
from tests.test_hf_reference import hf_config as deepseek_v3_config
from tests.test_model_equivalence import make_groups, single_batch

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def run_tool(name: str, argv: list[str]) -> tuple[int, str, str]:
    """``tools/<name>.py`` run in this process: exit status, stdout, stderr."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[name] = tool  # its dataclasses look their module up
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = tool.main(argv)
    return status, out.getvalue(), err.getvalue()


def convert(hf_dir: Path, output: Path) -> str:
    """``hf_dir`` imported (fp32) into the save dir ``output``; the converter's report."""
    status, out, err = run_tool(
        "convert_hf_checkpoint", ["--hf-dir", str(hf_dir), "--output", str(output), "--dtype", "float32"]
    )
    assert status == 0, out + err
    return out


def export(load: Path, output: Path, *extra: str) -> str:
    """Checkpoint ``load`` exported to ``output``; the exporter's report."""
    status, out, err = run_tool(
        "export_hf_checkpoint", ["--load", str(load), "--output", str(output), *extra]
    )
    assert status == 0, out + err
    return out


@contextlib.contextmanager
def megatron_process() -> Iterator[None]:
    """Megatron's parallel state for this process alone, for the parts of a test between tool runs
    (the tools set up and tear down their own)."""
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize()
    try:
        yield
    finally:
        dist_platform.destroy()


def checkpoint_model(ckpt: Path) -> torch.nn.Module:
    """The model checkpoint ``ckpt`` stores, built from its own model config (with a reward head
    when its objective is ``rm``) and loaded in this process (Megatron's parallel state must exist)."""
    from megatron_prefpack.losses.reward import attach_reward_head
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import config_from_yaml, model_config

    state = checkpoint.read_state(ckpt)
    model = build_model(model_config(config_from_yaml(state.config_yaml, str(ckpt))))
    if state.objective == "rm":
        attach_reward_head(model)
    checkpoint.load(ckpt, [model], restore_rng=False)
    return model


def changed_checkpoint(ckpt: Path, target: Path, reward: bool) -> None:
    """Language model ``ckpt`` with every weight changed (as training would), saved to ``target``;
    as a reward model (objective ``rm``, head attached after loading) when ``reward``."""
    from megatron_prefpack.losses.reward import attach_reward_head
    from megatron_prefpack.training import checkpoint

    model = checkpoint_model(ckpt)
    if reward:
        attach_reward_head(model)
    randomize(model, seed=7)
    state = checkpoint.read_state(ckpt)
    state = dataclasses.replace(state, objective="rm" if reward else "lm", world_size=1)
    checkpoint.save(target, state, [model], None, keep=0)


def assert_rewards_equal(ckpt: Path, hf_dir: Path) -> None:
    """Reward model ``ckpt``'s reward of each prompt + response (at its last token) equals the
    ``AutoModelForSequenceClassification`` of ``hf_dir`` (<= 1e-5)."""
    from megatron_prefpack.models.forward import model_forward

    with megatron_process():
        model = checkpoint_model(ckpt).eval()
        groups = make_groups(seed=3, vocab_size=model.vocab_size)
        with torch.no_grad():
            ours = {
                (g.group_id, k): model_forward(model, single_batch(g, k))[0, -1, 0]
                for g in groups
                for k in range(len(g.responses))
            }
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        for (gid, k), reward in ours.items():
            theirs = hf(input_ids=single_batch(groups[gid], k).tokens).logits[0, 0]
            assert (reward - theirs).abs().item() <= 1e-5, (gid, k)


COMMON = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
MODELS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True),
    "qwen3_moe_norm_topk": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "qwen3_moe_raw_topk": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=False,
    ),
    "deepseek_v3": lambda: deepseek_v3_config(deepseek_v3_shaped()),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **COMMON,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        attention_bias=True,
        use_qk_norm=True,
        n_routed_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
    ),
}


@pytest.fixture(scope="module", params=list(MODELS))
def hf_model(request, tmp_path_factory):
    hf = transformers.AutoModelForCausalLM.from_config(MODELS[request.param]()).eval()
    randomize(hf, seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()  # tied weights as saved
    return directory, hf_logprobs(hf, COMMON["vocab_size"])


@pytest.mark.usefixtures("megatron_single_process")
def test_import_is_exact_and_export_gives_the_same_tensors(hf_model) -> None:
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.models.hf import (
        SafetensorsCheckpoint,
        fill_model,
        generated_hf_config,
        hf_tensors,
        read_model_config,
    )

    directory, expected = hf_model
    arch, cfg = read_model_config(directory)
    hf_json = json.loads((directory / "config.json").read_text())
    assert arch.model_type == hf_json["model_type"]
    assert cfg.qk_layernorm == (arch.model_type in ("qwen3", "qwen3_moe", "glm4_moe"))
    assert cfg.attention_bias == (arch.model_type == "glm4_moe")
    generated_hf_config(arch, cfg)  # reads back as the same model
    model = build_model(cfg)
    source = SafetensorsCheckpoint(directory)
    fill_model(model, arch, cfg, source)
    assert source.used == set(source.files)
    assert_close(packed_logprobs(model, cfg.vocab_size), expected)

    exported = dict(hf_tensors(model, arch, cfg))
    original = read_tensors(directory)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_export_after_the_weights_change_gives_this_packages_logprobs(hf_model, tmp_path) -> None:
    """Import -> every weight changed -> export (source config.json, then a generated one):
    transformers loading either gives this package's packed log-probs."""
    directory, _ = hf_model
    source = json.loads((directory / "config.json").read_text())
    convert(directory, tmp_path / "mcore")
    with megatron_process():
        changed_checkpoint(tmp_path / "mcore", tmp_path / "changed", reward=False)
        ours = packed_logprobs(checkpoint_model(tmp_path / "changed"), COMMON["vocab_size"])
    for name, extra in (("from_source", ["--hf-config", str(directory)]), ("generated", [])):
        export(tmp_path / "changed", tmp_path / name, "--dtype", "float32", *extra)
        written = json.loads((tmp_path / name / "config.json").read_text())
        assert written["model_type"] == source["model_type"], name
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert hf.config.architectures == source["architectures"], name
        assert_close(ours, hf_logprobs(hf, COMMON["vocab_size"]))


@pytest.mark.parametrize("hf_model", ["qwen3"], indirect=True)
def test_qwen3_reward_model_exports_as_sequence_classification_with_equal_rewards(hf_model, tmp_path):
    directory, _ = hf_model
    convert(directory, tmp_path / "mcore")
    with megatron_process():
        changed_checkpoint(tmp_path / "mcore", tmp_path / "rm", reward=True)
    export(
        tmp_path / "rm",
        tmp_path / "hf",
        "--hf-config",
        str(directory),
        "--dtype",
        "float32",
        "--pad-token-id",
        "0",
    )
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen3ForSequenceClassification"] and hf_config["num_labels"] == 1
    assert "lm_head.weight" not in read_tensors(tmp_path / "hf")
    assert_rewards_equal(tmp_path / "rm", tmp_path / "hf")
