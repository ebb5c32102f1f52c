"""The DeepSeek-V3 / A.X K1-shaped model against an independent implementation, and the
Hugging Face checkpoint converter.

Hugging Face transformers' ``DeepseekV3ForCausalLM`` (MLA with interleaved YaRN RoPE, sigmoid
grouped routing with the score-correction bias, shared expert, dense first layer) gets random
weights and is saved with ``save_pretrained``. Its weights reach this package's Megatron-Core
model through ``models.hf`` (in process) and through ``tools/convert_hf_checkpoint.py``
(one process, expert parallel 2, uneven pipeline 2) plus ``dist_checkpointing``. Each response's
log-probs from preference-packed rows must equal those of Hugging Face running prompt + response
alone. Broken inputs (config, index, truncated or corrupt shards, a tensor the model needs but
the checkpoint lacks, a split the model does not allow) stop the converter with
``convert_hf_checkpoint: <file>: reason`` and exit 2 on every rank, also when one rank alone
meets them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.presets import preset
from tests.test_model_equivalence import make_batch, make_groups, response_token_logprobs, single_batch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV3ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV3ForCausalLM", allow_module_level=True)


def deepseek_v3_shaped() -> ModelConfig:
    """``tiny-mla-moe`` without A.X K1's post-MoE norm: DeepSeek-V3's architecture in miniature."""
    cfg = preset("tiny-mla-moe")
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, post_moe_norm=False))


def hf_config(cfg: ModelConfig):
    mla, moe, yarn = cfg.mla, cfg.moe, cfg.yarn
    return transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=moe.shared_expert_ffn_hidden_size // moe.expert_ffn_hidden_size,
        n_routed_experts=moe.num_experts,
        routed_scaling_factor=moe.routing_scaling_factor,
        kv_lora_rank=mla.kv_lora_rank,
        q_lora_rank=mla.q_lora_rank,
        qk_rope_head_dim=mla.qk_pos_emb_head_dim,
        qk_nope_head_dim=mla.qk_head_dim,
        v_head_dim=mla.v_head_dim,
        n_group=moe.num_groups,
        topk_group=moe.topk_groups,
        num_experts_per_tok=moe.top_k,
        first_k_dense_replace=moe.first_k_dense,
        norm_topk_prob=True,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=False,
        rope_interleave=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": cfg.rotary_base,
            "factor": yarn.scaling_factor,
            "original_max_position_embeddings": yarn.original_max_position_embeddings,
            "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow,
            "mscale": yarn.mscale,
            "mscale_all_dim": yarn.mscale_all_dim,
        },
        attn_implementation="eager",
    )


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A saved random DeepSeek-V3-shaped HF model and its log-probs for every response run alone."""
    cfg = deepseek_v3_shaped()
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(cfg)).eval()
    with torch.no_grad():  # exercise every weight, the correction bias included
        for name, param in hf.named_parameters():
            param.copy_(torch.randn_like(param) * (0.5 if "norm" in name else 0.1) + ("norm" in name))
        for layer in hf.model.layers[cfg.moe.first_k_dense :]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.moe.num_experts) * 0.1)
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    expected = {}
    with torch.no_grad():
        for group in make_groups(seed=3, vocab_size=cfg.vocab_size):
            for k in range(len(group.responses)):
                alone = single_batch(group, k)
                expected[(group.group_id, k)] = response_token_logprobs(
                    hf(input_ids=alone.tokens).logits, alone
                )[(group.group_id, k)]
    return directory, expected


def assert_packed_logprobs_match(model: torch.nn.Module, expected: dict) -> None:
    from megatron_prefpack.models.forward import model_forward

    cfg = deepseek_v3_shaped()
    batch = make_batch(make_groups(seed=3, vocab_size=cfg.vocab_size), "packed")
    with torch.no_grad():
        packed = response_token_logprobs(model_forward(model.eval(), batch), batch)
    assert packed.keys() == expected.keys()
    for key, reference in expected.items():
        diff = (packed[key] - reference).abs().max().item()
        assert diff <= 1e-5, f"response {key}: max |diff| {diff:.3g}"


def fused_expert_copy(source: Path, target: Path) -> Path:
    """``source`` rewritten with experts fused (``mlp.experts.gate_up_proj``), transformers 5's
    in-memory layout, to cover both storage formats."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(source / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in list(tensors):
        parts = name.split(".")
        if len(parts) == 8 and parts[3:5] == ["mlp", "experts"]:
            prefix = ".".join(parts[:5])
            fused.setdefault(prefix, {}).setdefault(int(parts[5]), {})[parts[6]] = tensors.pop(name)
    for prefix, experts in fused.items():
        order = sorted(experts)
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order]
        )
        tensors[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    target.mkdir()
    save_file(tensors, target / "model.safetensors")
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


@pytest.mark.usefixtures("megatron_single_process")
@pytest.mark.parametrize("storage", ["per_expert", "fused"])
def test_packed_logprobs_equal_hugging_face_run_alone(hf_checkpoint, storage, tmp_path) -> None:
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.models.hf import (
        ARCHITECTURES,
        SafetensorsCheckpoint,
        fill_model,
        model_config_from_hf,
    )

    directory, expected = hf_checkpoint
    if storage == "fused":
        directory = fused_expert_copy(directory, tmp_path / "fused")
    cfg = model_config_from_hf(json.loads((directory / "config.json").read_text()))
    assert cfg == deepseek_v3_shaped()
    model = build_model(cfg)
    source = SafetensorsCheckpoint(directory)
    report = fill_model(model, ARCHITECTURES["deepseek_v3"], cfg, source)
    assert report.filled == sum(isinstance(t, torch.Tensor) for t in model.state_dict().values())
    assert source.used == set(source.files)
    assert_packed_logprobs_match(model, expected)


CONVERT_LAYOUTS = {
    "one_process": (1, []),
    "ep2": (2, ["--expert", "2"]),
    "pp2_uneven": (2, ["--pipeline", "2", "--first-stage-layers", "1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(CONVERT_LAYOUTS))
def test_converted_checkpoint_loads_and_matches_hugging_face(hf_checkpoint, layout, tmp_path) -> None:
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.platform import distributed as dist_platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import TrainConfig, model_config

    directory, expected = hf_checkpoint
    nproc, extra = CONVERT_LAYOUTS[layout]
    script = [str(REPO / "tools" / "convert_hf_checkpoint.py")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), *script]
    output = tmp_path / "mcore"
    args = ["--hf-dir", str(directory), "--output", str(output), "--dtype", "float32", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 checkpoint tensors not used" in done.stdout

    import yaml

    model_section = yaml.safe_load((output / "model.yaml").read_text())["model"]
    cfg = model_config(TrainConfig(model=model_section))
    assert dataclasses.replace(cfg, params_dtype="float32") == deepseek_v3_shaped()
    dist_platform.initialize()
    try:
        model = build_model(cfg)
        checkpoint.load(output, [model])
        assert_packed_logprobs_match(model, expected)
    finally:
        dist_platform.destroy()


def test_fp8_blocks_are_dequantized_with_their_inverse_scales() -> None:
    from megatron_prefpack.models.hf.safetensors_io import dequantize_fp8

    weight = torch.randn(200, 130)
    scale_inv = torch.rand(2, 2) + 0.5
    blocks = scale_inv.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    quantized = (weight / blocks).to(torch.float8_e4m3fn)
    restored = dequantize_fp8(quantized, scale_inv)
    torch.testing.assert_close(restored, quantized.float() * blocks)
    assert (restored - weight).abs().max() <= 0.07 * weight.abs().max()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_interleave": False}, "rope_interleave=false"),
        ({"norm_topk_prob": False}, "norm_topk_prob=false"),
        ({"num_experts_per_tok": 2}, "num_experts_per_tok // topk_group = 2 // 2 != 2"),
        ({"kv_lora_rank": None}, None),
    ],
)
def test_config_translation_refuses_what_megatron_computes_differently(change, message) -> None:
    from megatron_prefpack.models.hf import ConversionError, model_config_from_hf

    base = hf_config(deepseek_v3_shaped()).to_dict()
    if message is None:  # a missing field
        base.pop(next(iter(change)))
        message = "missing field 'kv_lora_rank'"
    else:
        base.update(change)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
        model_config_from_hf(base)


def convert(argv: list[str]) -> tuple[int, str]:
    """``tools/convert_hf_checkpoint.py`` run in this process: its exit status and stderr."""
    spec = importlib.util.spec_from_file_location(
        "convert_hf_checkpoint", REPO / "tools" / "convert_hf_checkpoint.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = tool.main(argv)
    return status, err.getvalue()


def indexed_copy(source: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    """``source`` with a ``model.safetensors.index.json`` that maps every tensor but ``drop``."""
    from safetensors import safe_open

    shutil.copytree(source, target)
    with safe_open(target / "model.safetensors", framework="pt") as f:
        weight_map = {name: "model.safetensors" for name in f.keys() if name not in drop}  # noqa: SIM118
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return target


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _set_field(path: Path, key: str, value) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))


def _add_index_entry(index: Path, tensor: str, file: str) -> None:
    weight_map = json.loads(index.read_text())["weight_map"]
    index.write_text(json.dumps({"weight_map": {**weight_map, tensor: file}}))


BROKEN_INPUTS = {
    # name: (how the copy is broken, the file named ("": the directory), what the message says)
    "no_config": (lambda d: (d / "config.json").unlink(), "config.json", "No such file or directory"),
    "config_not_json": (
        lambda d: (d / "config.json").write_text("{\n  oops"),
        "config.json:2",
        "invalid JSON",
    ),
    "config_a_list": (
        lambda d: (d / "config.json").write_text("[]"),
        "config.json",
        "expected a JSON object",
    ),
    "config_wrong_type": (
        lambda d: _set_field(d / "config.json", "hidden_size", "64"),
        "config.json",
        "field 'hidden_size': expected int, got '64'",
    ),
    "config_out_of_range": (
        lambda d: _set_field(d / "config.json", "num_hidden_layers", 0),
        "config.json",
        "num_layers: must be >= 1",
    ),
    "truncated_shard": (
        lambda d: _truncate(d / "model.safetensors"),
        "model.safetensors",
        "unreadable safetensors file",
    ),
    "corrupt_shard": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json"),
        "model.safetensors",
        "unreadable safetensors file",
    ),
    "no_shard": (lambda d: (d / "model.safetensors").unlink(), "", "no *.safetensors files"),
    "index_not_json": (
        lambda d: (d / "model.safetensors.index.json").write_text("{"),
        "model.safetensors.index.json:1",
        "invalid JSON",
    ),
    "index_without_weight_map": (
        lambda d: (d / "model.safetensors.index.json").write_text("{}"),
        "model.safetensors.index.json",
        "needs a 'weight_map' object",
    ),
    "indexed_shard_missing": (
        lambda d: (d / "model.safetensors").rename(d / "other.safetensors"),
        "model.safetensors",
        "no such file",
    ),
    "indexed_shard_truncated": (
        lambda d: _truncate(d / "model.safetensors"),
        "model.safetensors",
        "unreadable safetensors file",
    ),
    "indexed_tensor_not_in_shard": (
        lambda d: _add_index_entry(d / "model.safetensors.index.json", "extra.weight", "model.safetensors"),
        "model.safetensors",
        "has no tensor 'extra.weight', which model.safetensors.index.json places there",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_INPUTS))
def test_converter_names_the_broken_file_and_exits_2(hf_checkpoint, case, tmp_path) -> None:
    """Bad files stop the converter before any model is built: ``<file>: reason``, exit 2."""
    break_copy, file, says = BROKEN_INPUTS[case]
    copy = tmp_path / "hf"
    if case.startswith("index"):
        indexed_copy(hf_checkpoint[0], copy)
    else:
        shutil.copytree(hf_checkpoint[0], copy)
    break_copy(copy)
    status, err = convert(["--hf-dir", str(copy), "--output", str(tmp_path / "out")])
    where = copy / file if file else copy
    assert status == 2 and f"convert_hf_checkpoint: {where}" in err and says in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("storage", ["indexed", "scanned"])
def test_converter_names_a_tensor_the_model_needs_but_the_checkpoint_lacks(hf_checkpoint, storage, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "hf"
    if storage == "indexed":
        indexed_copy(hf_checkpoint[0], copy, drop=("model.norm.weight",))
        source = copy / "model.safetensors.index.json"
    else:
        shutil.copytree(hf_checkpoint[0], copy)
        tensors = load_file(copy / "model.safetensors")
        del tensors["model.norm.weight"]
        save_file(tensors, copy / "model.safetensors")
        source = f"{copy}/*.safetensors"
    status, err = convert(["--hf-dir", str(copy), "--output", str(tmp_path / "out"), "--dtype", "float32"])
    assert status == 2 and "Traceback" not in err, err
    assert f"convert_hf_checkpoint: {source}: no entry for tensor 'model.norm.weight' (rank 0)" in err


def _convert_on_rank(argv: list[str]) -> tuple[int, str]:
    return convert(argv)


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank(hf_checkpoint, tmp_path) -> None:
    """Under expert parallel 2 only rank 1 reads experts 4-7: a tensor of one missing there
    must not leave rank 0 waiting for it. Both ranks exit 2; rank 0 names the tensor and the rank."""
    from tests.distributed import run_distributed

    lost = "model.layers.1.mlp.experts.5.down_proj.weight"
    copy = indexed_copy(hf_checkpoint[0], tmp_path / "hf", drop=(lost,))
    argv = ["--hf-dir", str(copy), "--output", str(tmp_path / "out"), "--dtype", "float32", "--expert", "2"]
    (status0, err0), (status1, err1) = run_distributed(_convert_on_rank, 2, argv, timeout=120)
    assert status0 == status1 == 2 and "convert_hf_checkpoint" not in err1, err0 + err1
    assert f"no entry for tensor '{lost}' (rank 1)" in err0 and "Traceback" not in err0
    assert not (tmp_path / "out" / "latest").exists()


def test_converter_refuses_a_split_the_model_does_not_allow_and_an_unusable_output(hf_checkpoint, tmp_path):
    directory = str(hf_checkpoint[0])
    status, err = convert(
        ["--hf-dir", directory, "--output", str(tmp_path / "out"), "--first-stage-layers", "5"]
    )
    assert status == 2 and "--first-stage-layers 5" in err and "(rank 0)" in err and "Traceback" not in err, (
        err
    )
    (tmp_path / "taken").write_text("")
    status, err = convert(["--hf-dir", directory, "--output", str(tmp_path / "taken")])
    assert status == 2 and f"convert_hf_checkpoint: {tmp_path / 'taken'}: File exists" in err, err
