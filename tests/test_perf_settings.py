"""GPU-only optimizer and communication settings: what reaches Megatron, and their refusal here.

- ``build_optimizer`` hands the precision-aware optimizer, moment dtypes and CPU offload to
  Megatron's ``OptimizerConfig`` under its field names (the same in megatron-core 0.16 and 0.19;
  the dataclass rejects unknown names);
- without a GPU ``load_config`` refuses them naming the key;
- on a GPU with Transformer Engine (skipped here): bf16 Adam moments, CPU-offloaded optimizer
  state and TE's TP communication overlap train like the defaults.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_prefpack.platform.features import has_transformer_engine
from tests.distributed import run_distributed
from tests.test_train import make_dataset, overrides

PRECISION_AWARE = [
    "parallel.distributed_optimizer=true",
    "optimizer.use_precision_aware_optimizer=true",
    "optimizer.exp_avg_dtype=bfloat16",
    "optimizer.exp_avg_sq_dtype=float16",
]
CPU_OFFLOAD = [
    *PRECISION_AWARE,
    "optimizer.optimizer_cpu_offload=true",
    "optimizer.optimizer_offload_fraction=0.5",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds")


def test_build_optimizer_passes_the_settings_to_megatron(monkeypatch) -> None:
    """The OptimizerConfig Megatron receives (its TE/CUDA checks in ``__post_init__`` skipped:
    this machine cannot build the optimizer itself)."""
    from megatron.core import optimizer as megatron_optimizer

    from megatron_prefpack.training.config import TrainConfig
    from megatron_prefpack.training.model_setup import build_optimizer

    received = []

    def fake_get_megatron_optimizer(config, chunks):
        received.append(config)
        return SimpleNamespace(scale_loss=None)

    monkeypatch.setattr(megatron_optimizer.OptimizerConfig, "__post_init__", lambda self: None)
    monkeypatch.setattr(megatron_optimizer, "get_megatron_optimizer", fake_get_megatron_optimizer)
    cfg = TrainConfig()
    opt = cfg.optimizer
    opt.use_precision_aware_optimizer, opt.exp_avg_dtype, opt.exp_avg_sq_dtype = True, "bfloat16", "float16"
    opt.optimizer_cpu_offload, opt.optimizer_offload_fraction = True, 0.25
    build_optimizer(cfg, [], SimpleNamespace(bf16=True, fp16=False, params_dtype=torch.bfloat16))
    (config,) = received
    assert config.use_precision_aware_optimizer is True
    assert (config.exp_avg_dtype, config.exp_avg_sq_dtype) == (torch.bfloat16, torch.float16)
    assert (config.optimizer_cpu_offload, config.optimizer_offload_fraction) == (True, 0.25)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refused_without_a_gpu_naming_the_key(dataset, tmp_path) -> None:
    """Through ``load_config``, before any work (single keys: tests/test_config.py)."""
    from megatron_prefpack.training.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, overrides(dataset, tmp_path, *CPU_OFFLOAD))
    assert "optimizer.use_precision_aware_optimizer: needs a CUDA GPU" in str(info.value)


@pytest.mark.skipif(has_transformer_engine(), reason="checks the refusal without Transformer Engine")
def test_tp_comm_overlap_setup_refuses_naming_the_key() -> None:
    """The userbuffer set-up itself refuses too (a config built in code skips load_config)."""
    from megatron_prefpack.models.presets import preset
    from megatron_prefpack.training.config import ConfigError, TrainConfig
    from megatron_prefpack.training.model_setup import init_tp_comm_overlap

    cfg = TrainConfig()
    init_tp_comm_overlap(cfg, preset("tiny-dense"))  # off: nothing to set up
    cfg.performance.tp_comm_overlap = True
    with pytest.raises(ConfigError, match=r"performance\.tp_comm_overlap: needs "):
        init_tp_comm_overlap(cfg, preset("tiny-dense"))


# ----------------------------------------------------------------------------- GPU only

needs_te = pytest.mark.skipif(not has_transformer_engine(), reason="needs a CUDA GPU and Transformer Engine")
BF16 = ["model.params_dtype=bfloat16", "objective.type=sft", "reference.mode=none", "run.train_steps=4"]


def _losses(args: list[str]) -> list[float]:
    from megatron_prefpack.training.config import load_config
    from megatron_prefpack.training.train import train

    return [h["loss"] for h in train(load_config(None, args)).history]


def _compare(
    dataset: Path, tmp_path: Path, world: int, base: list[str], setting: list[str], rtol: float
) -> None:
    want = run_distributed(_losses, world, overrides(dataset, tmp_path / "base", *BF16, *base), timeout=300)[
        0
    ]
    got = run_distributed(
        _losses, world, overrides(dataset, tmp_path / "set", *BF16, *base, *setting), timeout=300
    )[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=rtol)


@pytest.mark.gpu
@needs_te
def test_precision_aware_optimizer_trains_like_fp32_moments(dataset, tmp_path) -> None:
    _compare(dataset, tmp_path, 1, ["parallel.distributed_optimizer=true"], PRECISION_AWARE, rtol=2e-2)


@pytest.mark.gpu
@needs_te
def test_cpu_offloaded_optimizer_trains_like_the_gpu_one(dataset, tmp_path) -> None:
    offload = [*CPU_OFFLOAD[:2], *CPU_OFFLOAD[4:]]  # fp32 moments: only the state's device differs
    _compare(dataset, tmp_path, 1, [*PRECISION_AWARE[:2]], offload, rtol=1e-3)


@pytest.mark.gpu
@needs_te
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (tensor parallelism 2)")
def test_tp_comm_overlap_trains_like_plain_tensor_parallelism(dataset, tmp_path) -> None:
    tp2 = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
    _compare(dataset, tmp_path, 2, tp2, ["performance.tp_comm_overlap=true"], rtol=1e-2)
