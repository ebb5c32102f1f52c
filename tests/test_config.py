"""The training config: YAML + overrides -> dataclasses, and one clear error per bad config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_prefpack.models.config import ModelConfig, ModelConfigError
from megatron_prefpack.training.config import (
    Change,
    ConfigError,
    TrainConfig,
    apply_override,
    check_parallel_layout,
    config_from_yaml,
    load_config,
    model_config,
    resume_changes,
    to_yaml,
)


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))

BASE = """\
run:
  train_steps: 7
data:
  path: {data}
  seq_len: 64
  micro_batch_size: 2
  global_batch_size: 8
model:
  preset: tiny-moe
  num_layers: 4
objective:
  type: sft
"""


@pytest.fixture
def config_file(tmp_path: Path):
    (tmp_path / "ds").mkdir()

    def write(extra: str = "", base: str = BASE) -> Path:
        path = tmp_path / "train.yaml"
        path.write_text(base.format(data=tmp_path / "ds") + extra)
        return path

    return write


def error_of(path: Path | None, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_loads_sections_preset_overrides_and_cli_overrides(config_file):
    cfg = load_config(config_file(), ["optimizer.lr=3e-4", "model.moe.top_k=3", "data.layout=unpacked"])
    assert cfg.run.train_steps == 7
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.data.layout == "unpacked"
    model = model_config(cfg)
    assert model.num_layers == 4  # preset + field override
    assert model.moe.top_k == 3  # nested override merged into the preset's moe section
    assert model.moe.num_experts == 4  # the rest of the preset's moe section is kept
    assert "train_steps: 7" in to_yaml(cfg)


def test_dpo_options_are_the_loss_config(config_file):
    cfg = load_config(
        config_file("reference:\n  mode: online\n"),
        ["objective.type=dpo", "objective.dpo.beta=0.5", "objective.dpo.loss_type=ipo"],
    )
    assert cfg.objective.dpo.beta == 0.5 and cfg.objective.dpo.loss_type == "ipo"


def test_unknown_key_names_file_line_and_suggestion(config_file):
    path = config_file("optimizer:\n  lrr: 1.0e-4\n")
    message = error_of(path)
    assert f"{path}:14: optimizer.lrr: unknown key (did you mean 'lr'?)" in message


def test_unknown_section_and_model_field(config_file):
    assert "did you mean 'optimizer'" in error_of(config_file("optimiser:\n  lr: 1.0\n"))
    assert "model.num_layer: unknown key (did you mean 'num_layers'?)" in error_of(
        config_file(), ["model.num_layer=3"]
    )
    assert "unknown preset 'tiny-mo' (did you mean 'tiny-moe'?)" in error_of(
        config_file(), ["model.preset=tiny-mo"]
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr=fast", "optimizer.lr: expected a number, got 'fast'"),
        ("run.train_steps=2.5", "run.train_steps: expected an integer, got 2.5"),
        ("run.tensorboard=maybe", "run.tensorboard: expected true or false"),
        ("data.layout=packed", "data.layout: expected one of 'prefpack', 'duplicated', 'unpacked'"),
        ("objective.dpo.beta=-1", "objective.dpo: DPOConfig.beta must be > 0"),
        ("model.moe.top_k=99", "moe.top_k"),
        ("optimizer", "expected KEY=VALUE"),
    ],
)
def test_wrong_types_and_values(config_file, override, expected):
    assert expected in error_of(config_file(), [override])


def test_wrong_type_in_file_names_line(config_file):
    path = config_file(base=BASE.replace("seq_len: 64", "seq_len: long"))
    assert f"{path}:5: data.seq_len: expected an integer, got 'long'" in error_of(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.train_steps=0", "run.train_steps"),
        ("data.global_batch_size=7", "data.global_batch_size"),
        ("data.eval_fraction=1.5", "data.eval_fraction"),
        ("checkpoint.keep=-1", "checkpoint.keep"),
    ],
)
def test_out_of_range_values(config_file, override, key):
    assert f": {key}: " in error_of(config_file(), [override])


def test_missing_files(config_file, tmp_path):
    assert "data.path: no such dataset directory" in error_of(
        config_file(), [f"data.path={tmp_path / 'nope'}"]
    )
    assert "checkpoint.load: no such checkpoint" in error_of(
        config_file(), [f"checkpoint.load={tmp_path / 'x'}"]
    )
    assert "reference.path: no such file" in error_of(
        config_file(),
        ["objective.type=dpo", "reference.mode=offline", f"reference.path={tmp_path / 'r.npy'}"],
    )
    assert "reference.mode: DPO needs reference log-probs" in error_of(config_file(), ["objective.type=dpo"])
    assert "cannot read config file" in error_of(tmp_path / "missing.yaml")
    assert "data.path: required" in error_of(None)


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: [unclosed\n")
    assert "not valid YAML" in error_of(path)


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (["parallel.tensor=3"], 4, "does not divide the world size 4"),
        (["parallel.tensor=4", "parallel.sequence_parallel=true"], 4, "does not divide the 2 query groups"),
        (["parallel.expert=3"], 3, "parallel.expert: 3 does not divide the 4 experts"),
        (["parallel.pipeline=3"], 3, "does not divide the 4 layers"),
        (["parallel.tensor=2"], 2, "parallel.sequence_parallel: MoE with tensor parallel needs"),
        (["parallel.expert=2"], 1, "parallel.expert: 2 does not divide data*context = 1"),
        (["data.global_batch_size=2"], 2, "not a multiple of micro_batch_size*data_parallel = 2*2"),
        (["parallel.virtual_pipeline=2"], 1, "parallel.virtual_pipeline: needs parallel.pipeline >= 2"),
        (["parallel.first_stage_layers=1"], 1, "parallel.first_stage_layers: needs parallel.pipeline >= 2"),
        (
            ["parallel.pipeline=3", "parallel.first_stage_layers=1"],
            3,
            "3 of the 4 layers are left for 2 other stage(s)",
        ),
        (
            ["parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=2"],
            2,
            "1 of the 4 layers are left for 0 other stage(s)",
        ),
        (
            ["parallel.pipeline=2", "parallel.last_stage_layers=0"],
            2,
            "parallel.last_stage_layers: must be >= 1",
        ),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.first_stage_layers=2"],
            2,
            "parallel.virtual_pipeline: is not supported with first/last_stage_layers",
        ),
    ],
)
def test_parallel_layout_errors(config_file, overrides, world, expected):
    cfg = load_config(config_file(), overrides)
    with pytest.raises(ConfigError) as info:
        check_parallel_layout(cfg, world, model_config(cfg))
    assert expected in str(info.value)
    assert str(info.value).startswith("override '")  # the overrides made the layout wrong


def test_parallel_layout_ok(config_file):
    cfg = load_config(
        config_file(), ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"]
    )
    assert check_parallel_layout(cfg, 4, model_config(cfg)) == 2


@pytest.mark.parametrize(
    ("overrides", "world"),
    [
        (["parallel.pipeline=3", "parallel.first_stage_layers=2"], 3),
        (["parallel.pipeline=3", "parallel.last_stage_layers=2"], 3),
        (["parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.last_stage_layers=3"], 2),
    ],
)
def test_uneven_pipeline_stages(config_file, overrides, world):
    cfg = load_config(config_file(), overrides)
    assert check_parallel_layout(cfg, world, model_config(cfg)) == 1


def test_cluster_example_config_fits_its_256_gpus(tmp_path, monkeypatch):
    """examples/configs/ax_k1_dpo.yaml parses, and its layout divides A.X K1 on 256 ranks."""
    example = Path(__file__).parents[1] / "examples" / "configs" / "ax_k1_dpo.yaml"
    monkeypatch.chdir(tmp_path)
    for directory in ("data/ax_k1_prefs", "checkpoints/ax_k1_sft"):
        (tmp_path / directory).mkdir(parents=True)
    (tmp_path / "data/ax_k1_prefs/ref_logprobs.npy").touch()
    cfg = load_config(example)
    model = model_config(cfg)
    assert (model.num_layers, model.moe.num_experts) == (61, 192)
    assert check_parallel_layout(cfg, 256, model) == 8
    with pytest.raises(ConfigError, match="does not divide the world size 200"):
        check_parallel_layout(cfg, 200, model)


def test_override_returns_new_config(config_file):
    cfg = load_config(config_file())
    changed = apply_override(cfg, "run.seed=7")
    assert changed.run.seed == 7 and cfg.run.seed == 1234


# ----------------------------------------------------------------------------- values refused


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optimizer.lr=inf"], "optimizer.lr: must be a finite number > 0, got inf"),
        (["optimizer.lr=.nan"], "optimizer.lr: must be a finite number > 0, got nan"),
        (["optimizer.lr=0"], "optimizer.lr: must be a finite number > 0, got 0.0"),
        (["optimizer.min_lr=-1e-6"], "optimizer.min_lr: must be a finite number >= 0, got -1e-06"),
        (["optimizer.min_lr=1e-3"], "optimizer.min_lr: 0.001 is above optimizer.lr 1e-05"),
        (["optimizer.adam_eps=0"], "optimizer.adam_eps: must be a finite number > 0, got 0.0"),
        (["optimizer.adam_beta1=1.5"], "optimizer.adam_beta1: must be a finite number in [0, 1), got 1.5"),
        (["optimizer.adam_beta1=-0.1"], "optimizer.adam_beta1: must be a finite number in [0, 1)"),
        (["optimizer.adam_beta2=1"], "optimizer.adam_beta2: must be a finite number in [0, 1), got 1.0"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay: must be a finite number >= 0, got -0.1"),
        (["optimizer.clip_grad=-1"], "optimizer.clip_grad: must be a finite number >= 0 (0: no clipping)"),
        (["optimizer.clip_grad=nan"], "optimizer.clip_grad: must be a finite number >= 0 (0: no clipping)"),
        (["optimizer.decay_steps=0"], "optimizer.decay_steps: must be >= 1, got 0"),
        (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps: must be >= 0, got -1"),
        (["objective.dpo.beta=inf"], "objective.dpo.beta: must be a finite number, got inf"),
        (["objective.dpo.beta=0"], "objective.dpo: DPOConfig.beta must be > 0"),
        (
            ["objective.dpo.label_smoothing=0.5"],
            "objective.dpo: DPOConfig.label_smoothing must be in [0, 0.5)",
        ),
        (["objective.dpo.simpo_gamma=-.inf"], "objective.dpo.simpo_gamma: must be a finite number, got -inf"),
        (["objective.dpo.rpo_alpha=-1"], "objective.dpo: DPOConfig.rpo_alpha must be >= 0"),
        (["objective.dpo.rpo_alpha=inf"], "objective.dpo.rpo_alpha: must be a finite number, got inf"),
        (
            ["objective.rm.center_coefficient=-1"],
            "objective.rm.center_coefficient: must be a finite number >= 0",
        ),
        (
            ["objective.rm.head_init_std=0"],
            "objective.rm.head_init_std: must be a finite number > 0, got 0.0",
        ),
        (["run.max_nonfinite_steps=0"], "run.max_nonfinite_steps: must be >= 1, got 0"),
        (["run.timeout_minutes=0"], "run.timeout_minutes: must be a finite number > 0, got 0.0"),
        (["run.timeout_minutes=inf"], "run.timeout_minutes: must be a finite number > 0, got inf"),
        (["run.seed=-1"], "run.seed: must be >= 0, got -1"),
        (["data.eval_fraction=nan"], "data.eval_fraction: must be a finite number in [0, 1), got nan"),
        (["parallel.virtual_pipeline=0"], "parallel.virtual_pipeline: must be >= 1, got 0"),
        (["model.num_layers=0"], "model.num_layers: must be >= 1, got 0"),
        (["model.hidden_size=0"], "model.hidden_size: must be >= 1, got 0"),
        (["model.hidden_size=30"], "model.hidden_size: 30 is not divisible by num_attention_heads=4"),
        (["model.ffn_hidden_size=-1"], "model.ffn_hidden_size: must be >= 1, got -1"),
        (["model.num_attention_heads=0"], "model.num_attention_heads: must be >= 1, got 0"),
        (["model.vocab_size=0"], "model.vocab_size: must be >= 1, got 0"),
        (["model.max_position_embeddings=0"], "model.max_position_embeddings: must be >= 1, got 0"),
        (["model.num_query_groups=0"], "model.num_query_groups: must be >= 1, got 0"),
        (["model.kv_channels=0"], "model.kv_channels: must be >= 1, got 0"),
        (["model.norm_epsilon=0"], "model.norm_epsilon: must be > 0, got 0.0"),
        (["model.rotary_base=inf"], "model.rotary_base: must be a finite number, got inf"),
        (["model.rotary_percent=0"], "model.rotary_percent: must be in (0, 1], got 0.0"),
        (["model.init_method_std=nan"], "model.init_method_std: must be a finite number, got nan"),
        (["model.moe.num_experts=0"], "model.moe.num_experts: must be >= 1, got 0"),
        (["model.moe.top_k=5"], "model.moe.top_k: 5 must be in [1, num_experts=4]"),
        (["model.moe.expert_ffn_hidden_size=0"], "model.moe.expert_ffn_hidden_size: must be >= 1, got 0"),
        (["model.moe.aux_loss_coeff=-1"], "model.moe.aux_loss_coeff: must be >= 0, got -1.0"),
        (["model.moe.aux_loss_coeff=nan"], "model.moe.aux_loss_coeff: must be a finite number, got nan"),
        (["model.moe.routing_scaling_factor=0"], "model.moe.routing_scaling_factor: must be > 0, got 0.0"),
        (["model.moe.first_k_dense=-1"], "model.moe.first_k_dense: must be >= 0, got -1"),
        (
            ["model.preset=tiny-mla-moe", "model.mla.kv_lora_rank=0"],
            "model.mla.kv_lora_rank: must be >= 1, got 0",
        ),
        (
            ["model.preset=tiny-mla-moe", "model.yarn.scaling_factor=0"],
            "model.yarn.scaling_factor: must be > 0",
        ),
    ],
)
def test_refused_values_name_the_key_and_the_override(config_file, overrides, expected):
    message = error_of(config_file(), overrides)
    assert message.startswith(f"override {overrides[-1]!r}: {expected}"), message


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("optimizer:\n  lr: .inf\n", "14: optimizer.lr: must be a finite number > 0, got inf"),
        ("optimizer:\n  adam_eps: 0\n", "14: optimizer.adam_eps: must be a finite number > 0, got 0.0"),
        ("run:\n  timeout_minutes: -1\n", "14: run.timeout_minutes: must be a finite number > 0"),
    ],
)
def test_refused_values_in_the_file_name_its_line(config_file, section, expected):
    path = config_file(section)
    assert error_of(path).startswith(f"{path}:{expected}")


def test_model_config_error_names_the_field():
    fields = dataclasses.asdict(model_config(TrainConfig(model={"preset": "tiny-dense"})))
    with pytest.raises(ModelConfigError) as info:
        ModelConfig.from_dict({**fields, "num_layers": 0}, where="model")
    assert (info.value.key, info.value.reason) == ("model.num_layers", "must be >= 1, got 0")


# ----------------------------------------------------------------------------- where a value came from


def test_override_error_names_the_override_not_the_file_line(config_file):
    path = config_file("optimizer:\n  lr: 1.0e-3\n")
    assert error_of(path, ["optimizer.lr=inf"]) == (
        "override 'optimizer.lr=inf': optimizer.lr: must be a finite number > 0, got inf"
    )


def test_mapping_override_names_itself(config_file):
    message = error_of(config_file(), ["optimizer={lr: .inf}"])
    assert message == "override 'optimizer={lr: .inf}': optimizer.lr: must be a finite number > 0, got inf"


def test_file_value_still_names_the_file_after_other_overrides(config_file):
    path = config_file("optimizer:\n  adam_eps: 0\n")
    assert error_of(path, ["optimizer.lr=1e-3", "run.seed=3"]).startswith(f"{path}:14: optimizer.adam_eps:")


def test_error_between_keys_names_the_one_set_last(config_file):
    path = config_file("optimizer:\n  min_lr: 1.0e-4\n")
    assert error_of(path).startswith(f"{path}:14: optimizer.min_lr: 0.0001 is above optimizer.lr 1e-05")
    assert error_of(path, ["optimizer.lr=1e-5"]).startswith(
        "override 'optimizer.lr=1e-5': optimizer.min_lr: 0.0001 is above optimizer.lr 1e-05"
    )


def test_preset_field_broken_by_an_override_names_the_override(config_file):
    # tiny-moe's top_k=2 is fine until the override leaves one expert.
    assert error_of(config_file(), ["model.moe.num_experts=1"]).startswith(
        "override 'model.moe.num_experts=1': model.moe.top_k: 2 must be in [1, num_experts=1]"
    )


# ----------------------------------------------------------------------------- new run fields


def test_nonfinite_and_timeout_fields(config_file):
    cfg = load_config(config_file())
    assert (cfg.run.max_nonfinite_steps, cfg.run.timeout_minutes) == (3, 30.0)
    base = BASE.replace("run:\n", "run:\n  max_nonfinite_steps: 1\n  timeout_minutes: 2\n")
    cfg = load_config(config_file(base=base), ["run.timeout_minutes=0.5"])
    assert (cfg.run.max_nonfinite_steps, cfg.run.timeout_minutes) == (1, 0.5)
    assert "max_nonfinite_steps: 1" in to_yaml(cfg) and "timeout_minutes: 0.5" in to_yaml(cfg)


# ----------------------------------------------------------------------------- stored config, resume


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
@pytest.mark.parametrize(
    "overrides",
    [[], ["optimizer.lr=2e-4", "model.num_layers=8", "run.timeout_minutes=5", "data.path=elsewhere"]],
)
def test_stored_config_reads_back_equal(example, overrides):
    cfg = config_from_yaml(example.read_text(), str(example))  # its dataset need not exist here
    for override in overrides:
        cfg = apply_override(cfg, override)
    back = config_from_yaml(to_yaml(cfg), "checkpoint/prefpack.json")
    assert back == cfg
    assert to_yaml(back) == to_yaml(cfg)


def test_loaded_config_reads_back_equal(config_file):
    cfg = load_config(
        config_file(), ["model.moe.top_k=3", "optimizer.lr=3e-4", "objective.sft.responses=first"]
    )
    assert config_from_yaml(to_yaml(cfg), "stored") == cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("run: [unclosed\n", "ckpt/prefpack.json: not valid YAML"),
        (
            "optimizer:\n  lr: .inf\n",
            "ckpt/prefpack.json:2: optimizer.lr: must be a finite number > 0, got inf",
        ),
        (
            "model:\n  preset: tiny-moe\n  num_layers: 0\n",
            "ckpt/prefpack.json:3: model.num_layers: must be >= 1",
        ),
        ("data:\n  sequence_length: 4\n", "ckpt/prefpack.json:2: data.sequence_length: unknown key"),
    ],
)
def test_stored_config_errors_name_the_source(text, expected):
    with pytest.raises(ConfigError) as info:
        config_from_yaml(text, "ckpt/prefpack.json")
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize(
    ("override", "refused", "applied"),
    [
        ("data.seq_len=128", ["data.seq_len: 64 -> 128"], []),
        ("data.path=other/ds", ["data.path: {data} -> other/ds"], []),
        ("data.global_batch_size=16", ["data.global_batch_size: 8 -> 16"], []),
        ("data.layout=unpacked", ["data.layout: prefpack -> unpacked"], []),
        ("model.num_layers=2", ["model.num_layers: 4 -> 2"], []),
        ("model.moe.top_k=3", ["model.moe.top_k: 2 -> 3"], []),
        ("parallel.tensor=2", ["parallel.tensor: 1 -> 2"], []),
        ("parallel.first_stage_layers=1", ["parallel.first_stage_layers: None -> 1"], []),
        ("parallel.distributed_optimizer=true", ["parallel.distributed_optimizer: False -> True"], []),
        ("objective.type=rm", ["objective.type: sft -> rm"], []),
        ("objective.dpo.beta=0.2", ["objective.dpo.beta: 0.1 -> 0.2"], []),
        ("reference.mode=online", ["reference.mode: none -> online"], []),
        ("run.seed=1", ["run.seed: 1234 -> 1"], []),
        ("optimizer.lr=1e-3", [], ["optimizer.lr: 1e-05 -> 0.001"]),
        ("optimizer.decay_style=linear", [], ["optimizer.decay_style: cosine -> linear"]),
        ("run.train_steps=100", [], []),
        ("run.eval_interval=5", [], []),
        ("run.dir=elsewhere", [], []),
        ("run.timeout_minutes=5", [], []),
        ("run.max_nonfinite_steps=9", [], []),
        ("checkpoint.keep=5", [], []),
        ("reference.path=table.npy", [], []),
        ("reference.load=ckpt", [], []),
    ],
)
def test_resume_changes_by_class(config_file, tmp_path, override, refused, applied):
    saved = load_config(config_file())
    changes = resume_changes(saved, apply_override(saved, override))
    data = tmp_path / "ds"
    assert [str(change) for change in changes.refused] == [text.format(data=data) for text in refused]
    assert [str(change) for change in changes.applied] == applied


def test_resume_changes_lists_every_difference(config_file):
    saved = load_config(config_file())
    current = saved
    for override in ("data.seq_len=128", "optimizer.lr=1e-3", "optimizer.min_lr=1e-4", "run.seed=3"):
        current = apply_override(current, override)
    changes = resume_changes(saved, current)
    assert sorted(changes.refused) == [Change("data.seq_len", 64, 128), Change("run.seed", 1234, 3)]
    assert sorted(changes.applied) == [
        Change("optimizer.lr", 1e-5, 1e-3),
        Change("optimizer.min_lr", 0.0, 1e-4),
    ]
    assert resume_changes(saved, saved).refused == resume_changes(saved, saved).applied == []


def test_preset_and_its_fields_written_out_are_the_same_model(config_file):
    saved = load_config(config_file())
    expanded = {key: value for key, value in dataclasses.asdict(model_config(saved)).items() if key != "name"}
    changes = resume_changes(saved, dataclasses.replace(saved, model=expanded))
    assert (changes.refused, changes.applied) == ([], [])
    other = resume_changes(saved, apply_override(saved, "model.preset=tiny-dense"))
    assert "model.moe.num_experts: 4 -> None" in [str(change) for change in other.refused]


def _qwen3_config_dir(directory: Path) -> Path:
    """A tiny Qwen3 ``config.json`` written by transformers itself."""
    transformers = pytest.importorskip("transformers")
    transformers.Qwen3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ).save_pretrained(directory)
    return directory


def test_model_section_can_name_a_hugging_face_config(config_file, tmp_path):
    from megatron_prefpack.models.hf import read_model_config

    hf_dir = _qwen3_config_dir(tmp_path / "qwen3")
    base = BASE.replace("  preset: tiny-moe\n  num_layers: 4\n", "  attention_backend: reference\n")
    for given in (hf_dir, hf_dir / "config.json"):
        cfg = load_config(config_file(base=base), [f"model.hf_config={given}"])
        model = model_config(cfg)
        expected = read_model_config(hf_dir)[1]
        assert model.qk_layernorm and model.tie_embeddings and model.kv_channels == 8
        assert dataclasses.replace(model, attention_backend=expected.attention_backend) == expected
        assert model.attention_backend == "reference"  # fields next to hf_config override it


def test_model_hf_config_errors_name_the_key(config_file, tmp_path):
    hf_dir = _qwen3_config_dir(tmp_path / "qwen3")
    both = error_of(config_file(), [f"model.hf_config={hf_dir}"])
    assert "model.hf_config: give model.preset or model.hf_config, not both" in both
    base = BASE.replace("  preset: tiny-moe\n  num_layers: 4\n", "  attention_backend: reference\n")
    missing = error_of(config_file(base=base), [f"model.hf_config={tmp_path / 'nowhere'}"])
    assert f"override 'model.hf_config={tmp_path / 'nowhere'}': model.hf_config: " in missing
    assert "config.json" in missing


# ----------------------------------------------------------------------------- performance settings


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["performance.recompute_granularity=full"],
            "performance.recompute_method: required with recompute_granularity: full",
        ),
        (
            ["performance.recompute_method=block"],
            "performance.recompute_method: applies to recompute_granularity: full only",
        ),
        (
            ["performance.recompute_modules=[core_attn]"],
            "performance.recompute_modules: applies to recompute_granularity: selective only",
        ),
        (
            ["performance.recompute_granularity=selective", "performance.recompute_modules=[attn]"],
            "'attn' is not a module Megatron recomputes; choose from core_attn",
        ),
        (
            ["performance.recompute_granularity=selective", "performance.recompute_modules=[moe_act]"],
            "'moe_act' needs performance.moe_grouped_gemm: true",
        ),
        (
            [
                "performance.recompute_granularity=full",
                "performance.recompute_method=uniform",
                "performance.recompute_num_layers=0",
            ],
            "performance.recompute_num_layers: must be >= 1, got 0",
        ),
        (["ddp.overlap_param_gather=true"], "ddp.overlap_param_gather: needs parallel.distributed_optimizer"),
        (["ddp.bucket_size=0"], "ddp.bucket_size: must be >= 1, got 0"),
        (["optimizer.exp_avg_dtype=bfloat16"], "needs optimizer.use_precision_aware_optimizer: true"),
        (["optimizer.optimizer_offload_fraction=1.5"], "must be a finite number in [0, 1], got 1.5"),
        (["optimizer.optimizer_cpu_offload=true"], "needs parallel.distributed_optimizer: true"),
        (["performance.tp_comm_overlap=true"], "needs parallel.tensor > 1 with sequence_parallel: true"),
        (
            ["performance.moe_token_dispatcher_type=allgather", "performance.moe_shared_expert_overlap=true"],
            "performance.moe_shared_expert_overlap: needs moe_token_dispatcher_type: alltoall",
        ),
        (
            ["parallel.pipeline=2", "parallel.first_stage_layers=1", "parallel.pipeline_layout=Et|tttL"],
            "give parallel.pipeline_layout or first/last_stage_layers, not both",
        ),
        (["parallel.pipeline_layout=Ett|ttL"], "parallel.pipeline_layout: needs parallel.pipeline >= 2"),
    ],
)
def test_performance_settings_that_disagree_are_refused(config_file, overrides, expected):
    message = error_of(config_file(), overrides)
    assert expected in message
    assert message.startswith("override '")


@pytest.mark.skipif(torch_has_cuda(), reason="checks the refusals of a machine without a GPU")
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["performance.moe_grouped_gemm=true"], "performance.moe_grouped_gemm: needs a CUDA GPU"),
        (["performance.moe_permute_fusion=true"], "performance.moe_permute_fusion: needs a CUDA GPU"),
        (
            ["parallel.expert=2", "performance.moe_token_dispatcher_type=flex"],
            "needs a CUDA GPU and DeepEP (deep_ep)",
        ),
        (["performance.moe_shared_expert_overlap=true"], "moe_shared_expert_overlap: needs a CUDA GPU"),
        (["performance.fp8=e4m3"], "performance.fp8: needs a CUDA GPU and Transformer Engine"),
        (
            ["parallel.tensor=2", "parallel.sequence_parallel=true", "performance.tp_comm_overlap=true"],
            "performance.tp_comm_overlap: needs a CUDA GPU",
        ),
        (
            ["parallel.distributed_optimizer=true", "optimizer.use_precision_aware_optimizer=true"],
            "use_precision_aware_optimizer: needs a CUDA GPU",
        ),
        (
            ["performance.gradient_accumulation_fusion=true"],
            "needs a CUDA GPU and apex's fused_weight_gradient_mlp_cuda",
        ),
        (
            [
                "parallel.distributed_optimizer=true",
                "optimizer.use_precision_aware_optimizer=true",
                "optimizer.optimizer_cpu_offload=true",
            ],
            "needs a CUDA GPU",
        ),
    ],
)
def test_gpu_only_settings_are_refused_without_a_gpu(config_file, overrides, expected):
    assert expected in error_of(config_file(), overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["performance.moe_token_dispatcher_type=allgather"],
            "applies to MoE models; this model has no experts",
        ),
        (
            ["performance.recompute_granularity=selective", "performance.recompute_modules=[moe]"],
            "'moe' needs an MoE model",
        ),
        (
            ["performance.recompute_granularity=selective", "performance.recompute_modules=[mla_up_proj]"],
            "'mla_up_proj' needs an MLA model",
        ),
    ],
)
def test_settings_the_model_does_not_have_are_refused(config_file, overrides, expected):
    assert expected in error_of(config_file(), ["model.preset=tiny-dense", *overrides])


def test_settings_reach_megatrons_transformer_config(config_file):
    from megatron_prefpack.training.model_setup import transformer_config

    cfg = load_config(
        config_file(),
        [
            "performance.recompute_granularity=selective",
            "performance.recompute_modules=[core_attn, moe]",
            "performance.moe_token_dispatcher_type=allgather",
        ],
    )
    tcfg = transformer_config(cfg, model_config(cfg))
    assert tcfg.recompute_granularity == "selective"
    assert tcfg.recompute_modules == ["core_attn", "moe"]
    assert tcfg.moe_token_dispatcher_type == "allgather"
    assert not tcfg.apply_rope_fusion  # RoPE must follow the packed position ids
    full = apply_override(
        apply_override(
            apply_override(cfg, "performance.recompute_granularity=full"),
            "performance.recompute_modules=null",
        ),
        "performance.recompute_method=block",
    )
    full = apply_override(full, "performance.recompute_num_layers=2")
    tcfg = transformer_config(full, model_config(full))
    assert (tcfg.recompute_granularity, tcfg.recompute_method, tcfg.recompute_num_layers) == (
        "full",
        "block",
        2,
    )


@pytest.mark.parametrize(
    ("layout", "virtual", "expected"),
    [
        ("Et|tttL", None, None),
        ("Et|t|t|tL", 2, None),
        ("Et|t|t|tL", None, "parallel.virtual_pipeline: None but parallel.pipeline_layout has 2 virtual"),
        ("Et|ttL", None, "is not a layout of 4 layers over 2 stages"),
        ("tt|ttL", None, "is not a layout of 4 layers over 2 stages"),
        ("Et|tt|tL", None, "is not a layout of 4 layers over 2 stages"),
    ],
)
def test_pipeline_layout_is_checked_with_megatrons_parser(config_file, layout, virtual, expected):
    overrides = [
        "parallel.pipeline=2",
        f"parallel.pipeline_layout={layout}",
        f"parallel.virtual_pipeline={virtual}",
    ]
    cfg = load_config(config_file(), [o.replace("=None", "=null") for o in overrides])
    if expected is None:
        assert check_parallel_layout(cfg, 2, model_config(cfg)) == 1
    else:
        with pytest.raises(ConfigError) as info:
            check_parallel_layout(cfg, 2, model_config(cfg))
        assert expected in str(info.value)


@pytest.mark.parametrize(
    ("override", "refused", "noted"),
    [
        (
            "performance.recompute_granularity=selective",
            [],
            ["performance.recompute_granularity: None -> selective"],
        ),
        (
            "performance.moe_token_dispatcher_type=allgather",
            [],
            ["performance.moe_token_dispatcher_type: alltoall -> allgather"],
        ),
        ("ddp.overlap_grad_reduce=true", [], ["ddp.overlap_grad_reduce: False -> True"]),
        ("ddp.bucket_size=1000", [], ["ddp.bucket_size: None -> 1000"]),
        (
            "optimizer.use_precision_aware_optimizer=true",
            ["optimizer.use_precision_aware_optimizer: False -> True"],
            [],
        ),
        (
            "optimizer.optimizer_offload_fraction=0.5",
            ["optimizer.optimizer_offload_fraction: 1.0 -> 0.5"],
            [],
        ),
        ("parallel.pipeline_layout=Et|tttL", ["parallel.pipeline_layout: None -> Et|tttL"], []),
    ],
)
def test_resume_notes_speed_settings_and_refuses_optimizer_state_layout(
    config_file, override, refused, noted
):
    saved = load_config(config_file())
    current = apply_override(saved, override)
    changes = resume_changes(saved, current)
    assert [str(c) for c in changes.refused] == refused
    assert [str(c) for c in changes.noted] == noted
    assert changes.applied == []


def test_flex_dispatcher_needs_tensor_or_expert_parallel(config_file):
    message = error_of(config_file(), ["performance.moe_token_dispatcher_type=flex"])
    assert "'flex' needs parallel.tensor * parallel.expert > 1" in message


def test_mlp_recompute_needs_a_dense_layer(config_file):
    overrides = ["performance.recompute_granularity=selective", "performance.recompute_modules=[mlp]"]
    assert "'mlp': the model has no dense MLP layer" in error_of(config_file(), overrides)
    load_config(config_file(), [*overrides, "model.moe.first_k_dense=1"])


def megatron_before_017() -> bool:
    from megatron.core.package_info import __version__

    return tuple(map(int, __version__.split(".")[:2])) < (0, 17)


@pytest.mark.parametrize(
    ("overrides", "expected_on_016"),
    [
        (["performance.recompute_method=uniform", "performance.recompute_num_layers=3"], "does not divide"),
        (["performance.recompute_method=uniform", "performance.recompute_num_layers=2"], None),
        (
            ["performance.recompute_method=block", "performance.recompute_num_layers=1"],
            "without the pad mask",
        ),
        (["performance.recompute_method=block", "performance.recompute_num_layers=2"], None),
    ],
)
def test_full_recompute_cases_megatron_016_gets_wrong_are_refused_there(
    config_file, overrides, expected_on_016
):
    cfg = load_config(
        config_file(), ["performance.recompute_granularity=full", "parallel.pipeline=2", *overrides]
    )
    expected = expected_on_016 if megatron_before_017() else None
    if expected is None:
        assert check_parallel_layout(cfg, 2, model_config(cfg)) == 1
    else:
        with pytest.raises(ConfigError, match=expected):
            check_parallel_layout(cfg, 2, model_config(cfg))


@pytest.mark.parametrize(
    ("overrides", "counts"),
    [
        ([], [2, 2]),
        (["parallel.first_stage_layers=1"], [1, 3]),
        (["parallel.last_stage_layers=1"], [3, 1]),
        (["parallel.pipeline_layout=Et|t|t|tL", "parallel.virtual_pipeline=2"], [1, 1, 1, 1]),
        (["parallel.pipeline_layout=Et|tttL"], [1, 3]),
    ],
)
def test_chunk_layer_counts(config_file, overrides, counts):
    from megatron_prefpack.training.config import chunk_layer_counts

    cfg = load_config(config_file(), ["parallel.pipeline=2", *overrides])
    assert chunk_layer_counts(cfg, 4) == counts


def test_resume_refuses_bucket_layout_changes_with_the_distributed_optimizer(config_file):
    saved = load_config(config_file(), ["parallel.distributed_optimizer=true"])
    for override, change in (
        ("ddp.bucket_size=1000", "ddp.bucket_size: None -> 1000"),
        ("ddp.overlap_grad_reduce=true", "ddp.overlap_grad_reduce: False -> True"),
    ):
        changes = resume_changes(saved, apply_override(saved, override))
        assert [str(c) for c in changes.refused] == [change]
        assert changes.noted == []
    assert resume_changes(saved, apply_override(saved, "ddp.grad_reduce_in_fp32=false")).refused == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optimizer.use_precision_aware_optimizer=true"], "needs parallel.distributed_optimizer: true"),
        (
            ["parallel.distributed_optimizer=true", "optimizer.optimizer_cpu_offload=true"],
            "needs optimizer.use_precision_aware_optimizer: true",
        ),
    ],
)
def test_optimizer_settings_megatron_asserts_on_are_refused(config_file, overrides, expected):
    assert expected in error_of(config_file(), overrides)


def test_virtual_pipeline_needs_microbatches_in_multiples_of_the_pipeline(config_file):
    cfg = load_config(
        config_file(),
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "data.global_batch_size=6"],
    )
    with pytest.raises(ConfigError, match="3 micro-batches per data-parallel rank, not a multiple"):
        check_parallel_layout(cfg, 2, model_config(cfg))


def test_mla_with_tensor_parallel_needs_sequence_parallel(config_file):
    cfg = load_config(config_file(), ["model.preset=tiny-mla-moe", "model.moe=null", "parallel.tensor=2"])
    with pytest.raises(ConfigError, match="MLA with tensor parallel needs sequence_parallel: true"):
        check_parallel_layout(cfg, 2, model_config(cfg))


@pytest.mark.parametrize("setting", ["performance.fp8=e4m3", "performance.moe_grouped_gemm=true"])
def test_lora_refuses_settings_that_need_transformer_engine_layers(config_file, monkeypatch, setting):
    """On a GPU with Transformer Engine (pretended here) a LoRA model still builds Megatron's
    local layers, so the settings that live in TE's layers are refused."""
    from megatron_prefpack.platform import features

    monkeypatch.setattr(features, "missing_for", lambda needs: None)
    message = error_of(config_file(), ["model.lora.rank=4", setting])
    assert f"{setting.split('=')[0]}: needs Transformer Engine's layers, which LoRA does not adapt" in message
