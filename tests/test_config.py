"""The training config: YAML + overrides -> dataclasses, and one clear error per bad config."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_prefpack.training.config import (
    ConfigError,
    apply_override,
    check_parallel_layout,
    load_config,
    model_config,
    to_yaml,
)

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
    cfg = load_config(config_file(), ["optimizer.lr=3e-4", "model.moe.top_k=1", "data.layout=unpacked"])
    assert cfg.run.train_steps == 7
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.data.layout == "unpacked"
    model = model_config(cfg)
    assert model.num_layers == 4  # preset + field override
    assert model.moe.top_k == 1  # nested override merged into the preset's moe section
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
    assert str(config_file()) in str(info.value)


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
