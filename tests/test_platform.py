"""CPU/gloo platform: ``enable_cpu_megatron``, ``platform.distributed`` and the rank-process harness."""

from __future__ import annotations

import os
import time

import pytest
import torch

from megatron_prefpack.platform import cpu
from megatron_prefpack.platform import distributed as dist_platform
from tests.distributed import DistributedRunError, run_distributed

# --- enable_cpu_megatron ------------------------------------------------------------------------


def test_enable_cpu_megatron_refuses_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="refuses to patch Megatron-Core on a machine with CUDA"):
        cpu.enable_cpu_megatron()


def test_enable_cpu_megatron_is_idempotent() -> None:
    cpu.enable_cpu_megatron()
    current_device = torch.cuda.current_device
    cpu.enable_cpu_megatron()
    assert cpu.is_enabled()
    assert torch.cuda.current_device is current_device  # not wrapped twice
    assert torch.cuda.current_device() == torch.device("cpu")


def _config(**overrides: object) -> object:
    from megatron.core.transformer import TransformerConfig

    base = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "add_bias_linear": False}
    return TransformerConfig(**{**base, **overrides})


def test_check_cpu_config_accepts_a_cpu_config_and_names_every_problem() -> None:
    cpu.check_cpu_config(
        _config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, batch_p2p_comm=False)
    )
    bad = _config(
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        num_moe_experts=4,
        add_bias_linear=True,
        moe_grouped_gemm=True,
    )
    with pytest.raises(ValueError, match=r"batch_p2p_comm=True.*add_bias_linear=True.*moe_grouped_gemm=True"):
        cpu.check_cpu_config(bad)


def test_single_process_fixture(megatron_single_process: None) -> None:
    from megatron.core import parallel_state

    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert parallel_state.get_data_parallel_world_size() == 1
    assert dist_platform.device() == torch.device("cpu")


def test_rng_tracker_fork_uses_its_own_cpu_stream(megatron_single_process: None) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    torch.manual_seed(5)
    expected_default = torch.rand(4)
    torch.manual_seed(5)
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    # The default stream continues as if the forks had not happened; the tracked one advances.
    torch.testing.assert_close(torch.rand(4), expected_default)
    assert not torch.equal(first, second)
    assert not torch.equal(first, expected_default)


def test_checkpoint_without_output_recompute_compiles_nothing(
    megatron_single_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layernorm recompute's re-run reaches every view of the discarded output, with no C++
    extension built (0.19 JIT-compiles one; a killed compile's lock hung CI)."""
    from megatron.core.tensor_parallel import random as mcore_random

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("a C++ extension was compiled")

    monkeypatch.setattr(mcore_random, "load_inline", no_compiler, raising=False)  # 0.16: none
    x = torch.randn(3, 4, requires_grad=True)
    checkpoint = mcore_random.CheckpointWithoutOutput()
    hidden = checkpoint.checkpoint(torch.nn.functional.silu, x)
    view = hidden.view(4, 3)  # a view saved for backward, as a linear layer's input would be
    loss = (view * torch.arange(12.0).view(4, 3)).sum()
    checkpoint.discard_output_and_register_recompute(loss)
    assert hidden.untyped_storage().nbytes() == 0
    loss.backward()
    torch.testing.assert_close(view, torch.nn.functional.silu(x).view(4, 3), rtol=0, atol=0)
    expected = torch.autograd.grad(
        (torch.nn.functional.silu(x).view(4, 3) * torch.arange(12.0).view(4, 3)).sum(), x
    )
    torch.testing.assert_close(x.grad, expected[0])


def _rng_draws() -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    dist_platform.initialize(tensor_parallel=2, seed=11)
    with get_cuda_rng_tracker().fork():
        model_parallel = torch.rand(3)
    return model_parallel, torch.rand(3)


def test_rng_seeds_differ_across_tensor_parallel_ranks_only_in_the_tracker() -> None:
    (mp0, default0), (mp1, default1) = run_distributed(_rng_draws, 2)
    assert not torch.equal(mp0, mp1)
    torch.testing.assert_close(default0, default1)


def _uneven_collectives(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    dist_platform.initialize(tensor_parallel=2)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = group.rank()
    mine = torch.full((sizes[rank], 2), float(rank + 1))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
    summed_input = torch.arange(sum(sizes) * 2, dtype=torch.float).reshape(-1, 2) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(summed_input, group, input_split_sizes=sizes)
    return gathered, scattered


def test_uneven_gather_and_reduce_scatter_over_gloo() -> None:
    sizes = [3, 1]
    (gathered0, scattered0), (gathered1, scattered1) = run_distributed(_uneven_collectives, 2, sizes)
    expected_gather = torch.cat([torch.full((3, 2), 1.0), torch.full((1, 2), 2.0)])
    torch.testing.assert_close(gathered0, expected_gather)
    torch.testing.assert_close(gathered1, expected_gather)
    total = torch.arange(8, dtype=torch.float).reshape(4, 2) * 3  # rank factors 1 + 2
    torch.testing.assert_close(scattered0, total[:3])
    torch.testing.assert_close(scattered1, total[3:])


# --- platform.distributed -----------------------------------------------------------------------


def _clear_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)


def test_launch_env_reads_srun_variables_and_prefers_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_launcher_env(monkeypatch)
    assert dist_platform.launch_env() == dist_platform.LaunchEnv(rank=0, world_size=1, local_rank=0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist_platform.launch_env() == dist_platform.LaunchEnv(rank=5, world_size=8, local_rank=1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist_platform.launch_env() == dist_platform.LaunchEnv(rank=2, world_size=4, local_rank=0)


def test_launch_env_rejects_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_launcher_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        dist_platform.launch_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        dist_platform.launch_env()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"tensor_parallel": 2}, "not divisible by tensor_parallel x pipeline_parallel"),
        ({"expert_parallel": 2}, "expert_parallel=2 must divide context_parallel x data_parallel"),
        ({"virtual_pipeline_parallel": 2}, "virtual_pipeline_parallel=2 needs pipeline_parallel >= 2"),
        ({"context_parallel": 0}, "context_parallel must be >= 1"),
    ],
)
def test_initialize_rejects_layouts_that_do_not_fit(
    monkeypatch: pytest.MonkeyPatch, layout: dict[str, int], message: str
) -> None:
    _clear_launcher_env(monkeypatch)
    with pytest.raises(ValueError, match=message):
        dist_platform.initialize(**layout)


def _layout_ranks() -> list[tuple[int, ...]]:
    from megatron.core import parallel_state as ps

    seen = []
    for layout in ({"tensor_parallel": 2, "pipeline_parallel": 2}, {"expert_parallel": 4}):
        dist_platform.initialize(**layout)
        seen.append(
            (
                ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size(),
                ps.get_data_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(),
                ps.get_tensor_model_parallel_rank(),
                ps.get_pipeline_model_parallel_rank(),
            )
        )
        dist_platform.destroy(keep_process_group=True)  # a second layout in the same processes
    assert dist_platform.device() == torch.device("cpu")
    return seen


def test_initialize_layouts_and_reinitialize_on_four_ranks() -> None:
    per_rank = run_distributed(_layout_ranks, 4)
    tp2_pp2 = [seen[0] for seen in per_rank]
    assert tp2_pp2 == [(2, 2, 1, 1, rank % 2, rank // 2) for rank in range(4)]
    ep4 = [seen[1] for seen in per_rank]
    assert ep4 == [(1, 1, 4, 4, 0, 0)] * 4


# --- tests.distributed.run_distributed ----------------------------------------------------------


def _report_env() -> dict[str, str]:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    return {name: os.environ[name] for name in names}


def test_run_distributed_sets_launcher_environment_in_rank_order() -> None:
    envs = run_distributed(_report_env, 3)
    assert [env["RANK"] for env in envs] == ["0", "1", "2"]
    assert [env["LOCAL_RANK"] for env in envs] == ["0", "1", "2"]
    assert {env["WORLD_SIZE"] for env in envs} == {"3"}
    assert {env["MASTER_ADDR"] for env in envs} == {"127.0.0.1"}
    assert len({env["MASTER_PORT"] for env in envs}) == 1
    assert {env["OMP_NUM_THREADS"] for env in envs} == {"1"}


def _fail_on_rank_one(message: str) -> None:
    if int(os.environ["RANK"]) == 1:
        raise ValueError(message)
    time.sleep(120)  # must be killed, not awaited


def test_run_distributed_reports_the_failing_rank_and_kills_the_others() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"(?s)rank 1 raised:.*ValueError: boom"):
        run_distributed(_fail_on_rank_one, 2, "boom")
    assert time.monotonic() - start < 60


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_run_distributed_times_out() -> None:
    with pytest.raises(DistributedRunError, match=r"timed out after 2 s; ranks \[0, 1\] still running"):
        run_distributed(_sleep, 2, 120, timeout=2)


def _die_silently() -> None:
    os._exit(3)


def test_run_distributed_reports_a_rank_that_dies() -> None:
    with pytest.raises(DistributedRunError, match="exited with code 3 without reporting"):
        run_distributed(_die_silently, 1)


def _start_own_process() -> int | None:
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=os.getpid)
    child.start()
    child.join()
    return child.exitcode


def test_ranks_may_start_processes_of_their_own() -> None:
    assert run_distributed(_start_own_process, 2) == [0, 0]
