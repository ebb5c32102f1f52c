"""Hugging Face in and out for the official A.X K1 layout (transformers' ``AXK1ForCausalLM``),
against transformers itself.

A random tiny ``AXK1ForCausalLM`` (``mlp_layer_types``, layer-level ``post_mlp_layernorm``) is
saved with ``save_pretrained``, plus a multi-token-prediction layer's tensors (as the released
checkpoint has). Checked: the import gives packed log-probs equal to transformers on each
prompt + response alone; HF -> Megatron -> HF is bit-identical (MTP carried over), also when the
checkpoint was saved under TP2 and exported under EP2 or an uneven PP2; after the weights
change (randomly, and by 3 DPO steps of ``train`` from the import), transformers loading the
export gives this package's log-probs; a reward model exports as
``AXK1ForSequenceClassification`` with equal rewards; bad inputs exit 2 naming the file.
"""

from __future__ import annotations

import dataclasses
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
from tests.hf_checks import assert_close, hf_logprobs, packed_logprobs, randomize, read_tensors
from tests.test_hf_architectures import (
    assert_rewards_equal,
    changed_checkpoint,
    checkpoint_model,
    convert,
    export,
    megatron_process,
    run_tool,
)

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AXK1ForCausalLM"):
    pytest.skip("this transformers (< 5.24) has no AXK1ForCausalLM", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MTP_TENSORS = ("eh_proj.weight", "enorm.weight", "hnorm.weight")
EOS = 2


def axk1_shaped() -> ModelConfig:
    """``tiny-mla-moe``: A.X K1's architecture in miniature (dense first layer, post-MoE norm)."""
    return dataclasses.replace(preset("tiny-mla-moe"), name="hf")


def axk1_config(cfg: ModelConfig):
    mla, moe, yarn = cfg.mla, cfg.moe, cfg.yarn
    return transformers.AXK1Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=1,
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
        mlp_layer_types=["dense" if p == 0 else "sparse" for p in cfg.moe_layer_pattern()],
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        bos_token_id=1,
        eos_token_id=EOS,
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


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random AXK1ForCausalLM saved with save_pretrained, plus an MTP layer's tensors in a
    second shard (``num_nextn_predict_layers: 1``) and a tokenizer file to copy."""
    from safetensors.torch import save_file

    cfg = axk1_shaped()
    hf = transformers.AXK1ForCausalLM(axk1_config(cfg)).eval()
    randomize(hf, seed=0)
    directory = tmp_path_factory.mktemp("axk1")
    hf.save_pretrained(directory)
    mtp = {f"model.layers.{cfg.num_layers}.{n}": torch.randn(4, cfg.hidden_size) for n in MTP_TENSORS}
    save_file(mtp, directory / "mtp.safetensors")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return directory


def run_tool_distributed(name: str, nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    command = [*launcher, str(REPO / "tools" / f"{name}.py"), *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def converted(hf_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("mcore") / "ckpt"
    out = convert(hf_source, output)
    assert "kept aside for export: 3 tensors of multi-token-prediction layer(s) [3]" in out, out
    assert "0 checkpoint tensors not used" in out, out
    return output


@pytest.mark.usefixtures("megatron_single_process")
def test_import_gives_packed_logprobs_equal_to_transformers(hf_source, converted) -> None:
    cfg = axk1_shaped()
    expected = hf_logprobs(
        transformers.AutoModelForCausalLM.from_pretrained(hf_source).eval(), cfg.vocab_size
    )
    assert_close(packed_logprobs(checkpoint_model(converted), cfg.vocab_size), expected)


def test_round_trip_is_bit_identical_and_carries_the_mtp_layer(hf_source, converted, tmp_path) -> None:
    out = export(converted, tmp_path / "hf", "--hf-config", str(hf_source), "--dtype", "float32")
    assert "carried over" in out and f"model.layers.3.{MTP_TENSORS[0]}" in out, out
    source, exported = read_tensors(hf_source), read_tensors(tmp_path / "hf")
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor), name
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source)
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded).__name__ == "AXK1ForCausalLM"

    export(converted, tmp_path / "dropped", "--hf-config", str(hf_source), "--dtype", "float32", "--drop-mtp")
    assert read_tensors(tmp_path / "dropped").keys() == {
        n for n in source if not n.startswith("model.layers.3.")
    }


@pytest.mark.slow
def test_export_after_training_gives_this_packages_logprobs_in_transformers(hf_source, converted, tmp_path):
    with megatron_process():
        changed_checkpoint(converted, tmp_path / "trained", reward=False)
        ours = packed_logprobs(checkpoint_model(tmp_path / "trained"), axk1_shaped().vocab_size)
    export(tmp_path / "trained", tmp_path / "hf", "--hf-config", str(hf_source), "--dtype", "float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert_close(ours, hf_logprobs(hf, axk1_shaped().vocab_size))

    export(tmp_path / "trained", tmp_path / "generated", "--dtype", "float32")  # config from the model
    generated = json.loads((tmp_path / "generated" / "config.json").read_text())
    assert generated["model_type"] == "axk1" and "first_k_dense_replace" not in generated
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "generated").eval()
    assert_close(ours, hf_logprobs(hf, axk1_shaped().vocab_size))


@pytest.mark.slow
def test_a_model_trained_here_exports_with_this_packages_logprobs(hf_source, converted, tmp_path) -> None:
    """The imported model DPO-trained for 3 optimizer steps by ``train`` (the model section names
    the HF config), exported with the CLI: transformers' per-token log-probs of each prompt +
    response equal this package's packed ones for the trained weights."""
    from tests.test_train import make_dataset, overrides, train_ranks

    data = make_dataset(tmp_path / "data")
    info = json.loads((data / "dataset.json").read_text())
    info["tokenizer"].update(bos_id=None, eos_id=2, pad_id=0)  # a tokenizer that adds no BOS
    (data / "dataset.json").write_text(json.dumps(info))
    args = [a for a in overrides(data, tmp_path / "run") if not a.startswith("model.preset=")]
    model = [f"model.hf_config={hf_source}", "model.params_dtype=float32"]
    start = [f"checkpoint.load={converted}", "checkpoint.load_optimizer=false"]
    trained = Path(train_ranks(1, [*args, *model, *start])["checkpoint"])
    vocab_size = axk1_shaped().vocab_size
    with megatron_process():
        ours = packed_logprobs(checkpoint_model(trained), vocab_size)
        before = packed_logprobs(checkpoint_model(converted), vocab_size)
    assert all((ours[k] - before[k]).abs().max() > 1e-3 for k in ours), "training changed nothing"
    export(trained, tmp_path / "hf", "--hf-config", str(hf_source), "--dtype", "float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert_close(ours, hf_logprobs(hf, vocab_size))
    # Without --hf-config the generated config.json takes the training tokenizer's special ids.
    export(trained, tmp_path / "generated", "--dtype", "float32")
    generated = json.loads((tmp_path / "generated" / "config.json").read_text())
    assert (generated["bos_token_id"], generated["eos_token_id"], generated["pad_token_id"]) == (None, 2, 0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "generated").eval()
    assert_close(ours, hf_logprobs(hf, vocab_size))


@pytest.mark.slow
def test_reward_model_exports_as_sequence_classification_with_equal_rewards(hf_source, converted, tmp_path):
    with megatron_process():
        changed_checkpoint(converted, tmp_path / "rm", reward=True)
    status, _, err = run_tool(
        "export_hf_checkpoint",
        ["--load", str(tmp_path / "rm"), "--output", str(tmp_path / "bad"), "--hf-config", str(hf_source)],
    )
    assert status == 2 and "a reward model needs a pad_token_id" in err, err
    export(
        tmp_path / "rm",
        tmp_path / "hf",
        "--hf-config",
        str(hf_source),
        "--dtype",
        "float32",
        "--pad-token-id",
        "0",
    )
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["AXK1ForSequenceClassification"] and hf_config["pad_token_id"] == 0
    assert_rewards_equal(tmp_path / "rm", tmp_path / "hf")


def _resave_under_tp2(converted: str, target: str) -> None:
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.platform import distributed as dist_platform
    from megatron_prefpack.training import checkpoint

    dist_platform.initialize(tensor_parallel=2)
    model = build_model(axk1_shaped())
    state = checkpoint.load(converted, [model], restore_rng=False)
    checkpoint.save(target, dataclasses.replace(state, world_size=2), [model], None, keep=0)


PARALLEL_EXPORTS = {
    "tp2_saved": (1, []),
    "ep2": (2, ["--expert", "2"]),
    "pp2_uneven": (2, ["--pipeline", "2", "--first-stage-layers", "1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(PARALLEL_EXPORTS))
def test_parallel_export_is_bit_identical(hf_source, converted, layout, tmp_path) -> None:
    from tests.distributed import run_distributed

    nproc, extra = PARALLEL_EXPORTS[layout]
    load = converted
    if layout == "tp2_saved":
        load = tmp_path / "tp2"
        run_distributed(_resave_under_tp2, 2, str(converted), str(load), timeout=180)
    argv = [
        "--load",
        str(load),
        "--output",
        str(tmp_path / "hf"),
        "--hf-config",
        str(hf_source),
        "--dtype",
        "float32",
    ]
    if nproc == 1:
        export(load, tmp_path / "hf", *argv[4:])
    else:
        done = run_tool_distributed("export_hf_checkpoint", nproc, [*argv, *extra])
        assert done.returncode == 0, done.stdout + done.stderr
    source, exported = read_tensors(hf_source), read_tensors(tmp_path / "hf")
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor), name


def test_export_refuses_a_non_empty_output_and_another_models_config(hf_source, converted, tmp_path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    status, _, err = run_tool(
        "export_hf_checkpoint", ["--load", str(converted), "--output", str(tmp_path / "taken")]
    )
    assert status == 2 and f"export_hf_checkpoint: {tmp_path / 'taken'}: exists and is not empty" in err, err

    other = tmp_path / "other"
    shutil.copytree(hf_source, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps(
            {
                **config,
                "routed_scaling_factor": 1.0,
                "num_hidden_layers": 4,
                "mlp_layer_types": ["dense"] + ["sparse"] * 3,
            }
        )
    )
    status, _, err = run_tool(
        "export_hf_checkpoint",
        ["--load", str(converted), "--output", str(tmp_path / "out"), "--hf-config", str(other)],
    )
    assert status == 2 and f"export_hf_checkpoint: {other / 'config.json'}: describes another model" in err, (
        err
    )
    assert "num_layers: 3 != 4" in err and "moe.routing_scaling_factor: 2.5 != 1.0" in err, err
    assert not (tmp_path / "out").exists() and "Traceback" not in err


def test_a_missing_correction_bias_is_zero_filled_as_transformers_does(hf_source, tmp_path) -> None:
    """The released A.X K1 checkpoints have no ``e_score_correction_bias``; transformers loads
    zeros and so does the importer, saying so. DeepSeek-V3 (where transformers reports the tensor
    as missing) refuses."""
    from safetensors.torch import load_file, save_file

    from megatron_prefpack.models.hf import ARCHITECTURES, ConversionError, SafetensorsCheckpoint, fill_model

    copy = tmp_path / "nobias"
    shutil.copytree(hf_source, copy)
    tensors = load_file(copy / "model.safetensors")
    dropped = [n for n in tensors if n.endswith("e_score_correction_bias")]
    save_file({n: t for n, t in tensors.items() if n not in dropped}, copy / "model.safetensors")
    status, out, err = run_tool(
        "convert_hf_checkpoint",
        ["--hf-dir", str(copy), "--output", str(tmp_path / "out"), "--dtype", "float32"],
    )
    assert status == 0, out + err
    assert (
        f"{len(dropped)} tensors absent from the checkpoint, filled with zeros as transformers does for axk1"
        in out
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(copy)
    assert all(not layer.mlp.gate.e_score_correction_bias.any() for layer in hf.model.layers[1:])

    with megatron_process():
        from megatron_prefpack.models.builder import build_model

        cfg = axk1_shaped()
        with pytest.raises(
            ConversionError,
            match=r"no entry for tensor 'model\.layers\.1\.mlp\.gate\.e_score_correction_bias'",
        ):
            fill_model(build_model(cfg), ARCHITECTURES["deepseek_v3"], cfg, SafetensorsCheckpoint(copy))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"rms_norm_eps": 1e-5},
            "rms_norm_eps=1e-05: transformers normalises MLA's q_a/kv_a latents with eps 1e-6",
        ),
        ({"mlp_layer_types": ["dense", "sparse"]}, "field 'mlp_layer_types': expected 3 entries"),
        ({"q_lora_rank": None}, "missing field 'q_lora_rank'"),
        ({"model_type": "gpt2"}, "model_type='gpt2': not one of"),
    ],
)
def test_a_config_the_import_cannot_translate_exactly_is_refused(
    hf_source, tmp_path, change, message
) -> None:
    copy = tmp_path / "hf"
    shutil.copytree(hf_source, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    status, _, err = run_tool(
        "convert_hf_checkpoint", ["--hf-dir", str(copy), "--output", str(tmp_path / "out")]
    )
    assert status == 2 and f"convert_hf_checkpoint: {copy / 'config.json'}: {message}" in err, err
