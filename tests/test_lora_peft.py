"""LoRA adapters to Hugging Face, checked against ``peft`` and transformers themselves.

A random tiny HF model (Qwen3: dense, fused QKV and SwiGLU rows split per HF linear; A.X K1: MLA
with query compression, shared experts, and routed-expert adapters onto transformers' fused
experts) is imported, LoRA-wrapped with random non-zero A and B, and its packed log-probs taken.
Its adapters written as a PEFT adapter and loaded with ``peft.PeftModel.from_pretrained`` onto
the HF model give the same per-token log-probs (<= 1e-5, fp32), with every tensor PEFT holds
equal to the one written; the adapters merged into the weights and exported give them too.
Through the tool, from a LoRA checkpoint (adapters only, naming its base): ``--peft-adapter``,
``--output`` (merged on the fly) and ``prefpack merge-lora`` + export all give the LoRA model's
log-probs; a reward model's adapter (``SEQ_CLS`` with its head) gives its rewards; EP2 and PP2
exports equal the one-process adapter bit for bit. Refused: ``--peft-adapter`` for a checkpoint
without adapters (exit 2, named), and dense-MLP adapters for a model type whose MLP targets PEFT
redirects to the routed experts (that list checked against PEFT's own rewrite); the attention
adapters of such a model (DeepSeek-V3 MLA) load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_prefpack.models.config import LoRAConfig
from tests.hf_checks import assert_close, hf_logprobs, packed_logprobs, randomize
from tests.test_hf_architectures import MODELS, convert, megatron_process, run_tool

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL_MLP_AND_ATTENTION = [
    "linear_qkv",
    "linear_proj",
    "linear_q_down_proj",
    "linear_q_up_proj",
    "linear_kv_down_proj",
    "linear_kv_up_proj",
    "linear_fc1",
    "linear_fc2",
]


def _axk1():
    from tests.test_hf_export import axk1_config, axk1_shaped

    return axk1_config(axk1_shaped())


CASES = {
    "qwen3": (MODELS["qwen3"], LoRAConfig(rank=4, alpha=8.0, target_modules=ALL_MLP_AND_ATTENTION)),
    "axk1": (
        _axk1,
        LoRAConfig(rank=3, alpha=12.0, target_modules=ALL_MLP_AND_ATTENTION, routed_experts=True),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def hf_dir(request, tmp_path_factory) -> tuple[Path, LoRAConfig]:
    """A random tiny HF model saved with ``save_pretrained``, and the LoRA config to adapt it with."""
    make_config, lora = CASES[request.param]
    hf = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
    randomize(hf, seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return directory, lora


def lora_model(directory: Path, lora: LoRAConfig):
    """``directory``'s weights imported, LoRA applied with random A and B; (arch, cfg, model)."""
    from megatron_prefpack.models.builder import build_model
    from megatron_prefpack.models.hf import SafetensorsCheckpoint, fill_model, read_model_config
    from megatron_prefpack.models.lora import apply_lora, is_adapter_parameter

    arch, cfg = read_model_config(directory)
    model = build_model(cfg)
    fill_model(model, arch, cfg, SafetensorsCheckpoint(directory))
    assert apply_lora(model, lora) > 0
    randomize_adapters(model, is_adapter_parameter)
    return arch, dataclasses.replace(cfg, lora=lora), model


def randomize_adapters(model: torch.nn.Module, is_adapter) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter(name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    from megatron_prefpack.models.hf.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    directory.mkdir(parents=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, directory / ADAPTER_WEIGHTS)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))


def peft_logprobs(base_dir: Path, adapter_dir: Path, written: dict[str, torch.Tensor] | None = None):
    """Log-probs of the HF model in ``base_dir`` with the PEFT adapter ``adapter_dir`` loaded; every
    adapter tensor PEFT holds equals the one written (none dropped, none left at its init)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    if written is not None:
        held = peft.get_peft_model_state_dict(model)
        assert held.keys() == written.keys()
        for name, tensor in written.items():
            assert torch.equal(held[name], tensor), name
    return hf_logprobs(model, base.config.vocab_size)


@pytest.mark.usefixtures("megatron_single_process")
def test_peft_adapter_and_merged_model_give_the_lora_models_logprobs(hf_dir, tmp_path) -> None:
    from safetensors.torch import save_file

    from megatron_prefpack.models.hf import hf_tensors
    from megatron_prefpack.models.hf.peft import adapter_pieces, peft_adapter
    from megatron_prefpack.models.lora import merge_adapters

    directory, lora = hf_dir
    arch, cfg, model = lora_model(directory, lora)
    vocab = cfg.vocab_size
    ours = packed_logprobs(model, vocab)
    base = hf_logprobs(transformers.AutoModelForCausalLM.from_pretrained(directory).eval(), vocab)
    assert all((ours[k] - base[k]).abs().max() > 1e-3 for k in ours), "the adapters change nothing"

    tensors, config = peft_adapter(*adapter_pieces(model, arch, cfg), arch, cfg)
    assert config["r"] == lora.rank and config["lora_alpha"] == lora.alpha
    assert (config["target_parameters"] is not None) == lora.routed_experts
    write_adapter(tmp_path / "adapter", tensors, config)
    assert_close(ours, peft_logprobs(directory, tmp_path / "adapter", tensors))

    merge_adapters([model])
    assert_close(ours, packed_logprobs(model, vocab))
    (tmp_path / "merged").mkdir()
    save_file(dict(hf_tensors(model, arch, cfg)), tmp_path / "merged" / "model.safetensors")
    shutil.copyfile(directory / "config.json", tmp_path / "merged" / "config.json")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(ours, hf_logprobs(merged, vocab))


def test_peft_redirects_mlp_targets_for_exactly_the_listed_model_types() -> None:
    """PEFT rewrites ``gate_proj``/``up_proj``/``down_proj`` targets to the fused routed experts
    for some model types: the exporter's list of them must be PEFT's."""
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    from megatron_prefpack.models.hf import ARCHITECTURES
    from megatron_prefpack.models.hf.peft import PEFT_REWRITES_MLP_TARGETS

    rewritten = set()
    for model_type in ARCHITECTURES:
        config = peft.LoraConfig(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
        stub = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
        convert_peft_config_for_transformers(config, stub, None)
        if "gate_proj" not in config.target_modules:
            rewritten.add(model_type)
    assert rewritten == PEFT_REWRITES_MLP_TARGETS


@pytest.mark.usefixtures("megatron_single_process")
def test_dense_mlp_adapters_are_refused_where_peft_would_not_load_them(tmp_path) -> None:
    from megatron_prefpack.models.hf import ConversionError
    from megatron_prefpack.models.hf.peft import adapter_pieces, peft_adapter

    hf = transformers.AutoModelForCausalLM.from_config(MODELS["deepseek_v3"]()).eval()
    randomize(hf, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    arch, cfg, model = lora_model(
        tmp_path / "hf", LoRAConfig(rank=2, target_modules=["linear_fc1", "linear_proj"])
    )
    with pytest.raises(ConversionError, match=r"gate_proj, up_proj\).*PEFT redirects.*merged"):
        peft_adapter(*adapter_pieces(model, arch, cfg), arch, cfg)
    # Attention adapters of the same model type load (MLA without routed experts).
    attention = LoRAConfig(rank=2, target_modules=["linear_proj", "linear_kv_up_proj", "linear_q_up_proj"])
    arch, cfg, model = lora_model(tmp_path / "hf", attention)
    ours = packed_logprobs(model, cfg.vocab_size)
    tensors, config = peft_adapter(*adapter_pieces(model, arch, cfg), arch, cfg)
    assert config["target_modules"] == ["kv_b_proj", "o_proj", "q_b_proj"]
    write_adapter(tmp_path / "adapter", tensors, config)
    assert_close(ours, peft_logprobs(tmp_path / "hf", tmp_path / "adapter", tensors))


# ----------------------------------------------------------------------------- the tool


def lora_checkpoint(directory: Path, lora: LoRAConfig, target: Path, reward: bool = False) -> None:
    """``directory`` imported, then saved as a LoRA model's checkpoint with random adapters (and
    a random reward head, objective ``rm``, when ``reward``)."""
    import yaml

    from megatron_prefpack.losses.reward import attach_reward_head
    from megatron_prefpack.training import checkpoint
    from tests.test_hf_architectures import checkpoint_model

    convert(directory, target.with_name("base"))
    with megatron_process():
        from megatron_prefpack.models.lora import apply_lora, is_adapter_parameter

        model = checkpoint_model(target.with_name("base"))
        apply_lora(model, lora)
        if reward:
            attach_reward_head(model, init_std=0.5)
        randomize_adapters(model, is_adapter_parameter)
        state = checkpoint.read_state(target.with_name("base"))
        config = yaml.safe_load(state.config_yaml)
        config["model"]["lora"] = dataclasses.asdict(lora)
        state = dataclasses.replace(
            state,
            config_yaml=yaml.safe_dump(config),
            world_size=1,
            objective="rm" if reward else state.objective,
            base=checkpoint.identity(target.with_name("base")),
        )
        checkpoint.save(target, state, [model], None, keep=0)


def test_tool_exports_a_lora_checkpoint_as_peft_adapter_and_merged(hf_dir, tmp_path) -> None:
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import config_from_yaml
    from megatron_prefpack.training.merge_lora import merge_lora
    from tests.test_hf_architectures import checkpoint_model, export

    directory, lora = hf_dir
    lora_checkpoint(directory, lora, tmp_path / "lora")
    with megatron_process():
        model = checkpoint_model(tmp_path / "lora")
        ours = packed_logprobs(model, model.vocab_size)
    base = hf_logprobs(transformers.AutoModelForCausalLM.from_pretrained(directory).eval(), model.vocab_size)
    assert all((ours[k] - base[k]).abs().max() > 1e-3 for k in ours), "the checkpoint's adapters are lost"
    export(tmp_path / "lora", tmp_path / "merged", "--hf-config", str(directory), "--dtype", "float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(ours, hf_logprobs(merged, merged.config.vocab_size))
    # prefpack merge-lora, then the export of the plain checkpoint it writes: the same.
    state = checkpoint.read_state(tmp_path / "lora")
    merge_lora(config_from_yaml(state.config_yaml, "lora"), tmp_path / "lora", tmp_path / "full")
    export(
        tmp_path / "full", tmp_path / "via_merge_lora", "--hf-config", str(directory), "--dtype", "float32"
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "via_merge_lora").eval()
    assert_close(ours, hf_logprobs(merged, merged.config.vocab_size))

    adapter = ["--peft-adapter", str(tmp_path / "peft"), "--dtype", "float32"]
    status, out, err = run_tool(
        "export_hf_checkpoint", ["--load", str(tmp_path / "lora"), *adapter, "--hf-config", str(directory)]
    )
    assert status == 0, out + err
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(directory) and config["task_type"] == "CAUSAL_LM"
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert_close(ours, peft_logprobs(directory, tmp_path / "peft"))


@pytest.mark.parametrize("hf_dir", ["qwen3"], indirect=True)
def test_peft_adapter_of_a_checkpoint_without_adapters_exits_2_naming_why(hf_dir, tmp_path) -> None:
    directory, _ = hf_dir
    convert(directory, tmp_path / "base")
    status, out, err = run_tool(
        "export_hf_checkpoint", ["--load", str(tmp_path / "base"), "--peft-adapter", str(tmp_path / "peft")]
    )
    assert status == 2, out + err
    assert "not a LoRA checkpoint (its model.lora is not set)" in err and str(tmp_path / "base") in err
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("hf_dir", ["qwen3"], indirect=True)
def test_reward_model_adapter_loads_as_sequence_classification_with_equal_rewards(hf_dir, tmp_path) -> None:
    """A LoRA reward model's adapter (``SEQ_CLS``, its trained head as ``score``) on
    ``AutoModelForSequenceClassification`` of the base model gives this package's rewards."""
    from megatron_prefpack.models.forward import model_forward
    from tests.test_hf_architectures import checkpoint_model
    from tests.test_model_equivalence import make_groups, single_batch

    directory, lora = hf_dir
    lora_checkpoint(directory, lora, tmp_path / "rm", reward=True)
    status, out, err = run_tool(
        "export_hf_checkpoint",
        ["--load", str(tmp_path / "rm"), "--peft-adapter", str(tmp_path / "peft"), "--dtype", "float32"],
    )
    assert status == 0, out + err
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    with megatron_process():
        model = checkpoint_model(tmp_path / "rm").eval()
        groups = make_groups(seed=3, vocab_size=model.vocab_size)
        with torch.no_grad():
            ours = {
                (g.group_id, k): model_forward(model, single_batch(g, k))[0, -1, 0]
                for g in groups
                for k in range(len(g.responses))
            }
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=1, pad_token_id=0
    )
    hf = peft.PeftModel.from_pretrained(base.eval(), tmp_path / "peft").eval()
    with torch.no_grad():
        for (gid, k), reward in ours.items():
            theirs = hf(input_ids=single_batch(groups[gid], k).tokens).logits[0, 0]
            assert (reward - theirs).abs().item() <= 1e-5, (gid, k, reward.item(), theirs.item())


@pytest.mark.parametrize("hf_dir", ["axk1"], indirect=True)
@pytest.mark.parametrize(
    "layout", [["--expert", "2"], ["--pipeline", "2", "--first-stage-layers", "1"]], ids=["ep2", "pp2"]
)
def test_adapter_exported_over_two_ranks_equals_the_one_process_export(hf_dir, layout, tmp_path) -> None:
    """Routed-expert adapters gathered from two expert-parallel ranks, or the layers from two
    pipeline stages, give the one-process adapter bit for bit."""
    from tests.hf_checks import read_tensors
    from tests.test_hf_export import run_tool_distributed

    directory, lora = hf_dir
    lora_checkpoint(directory, lora, tmp_path / "lora")
    argv = ["--load", str(tmp_path / "lora"), "--dtype", "float32", "--peft-adapter"]
    status, out, err = run_tool("export_hf_checkpoint", [*argv, str(tmp_path / "one")])
    assert status == 0, out + err
    result = run_tool_distributed("export_hf_checkpoint", 2, [*argv, str(tmp_path / "two"), *layout])
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        assert torch.equal(tensor, two[name]), name
    config = (tmp_path / "one" / "adapter_config.json").read_text()
    assert config == (tmp_path / "two" / "adapter_config.json").read_text()
