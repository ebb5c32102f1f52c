"""The packing invariant under model parallelism (gloo processes, fp32, CPU): per-token log-probs of
every response in preference-packed rows, computed with TP=2 + sequence parallelism, EP=2, PP=2 (even
and uneven stages) and TP2 x EP2, equal those of each prompt + response run alone on a single process;
for the dense, MoE and MLA presets and the Hugging Face architectures' (Qwen3, Qwen3-MoE, GLM-4.5).

One single-process run writes its weights with Megatron's ``dist_checkpointing`` and computes the
reference; each parallel layout loads the same weights (resharded by Megatron) and runs the
packed rows (PP through Megatron's pipeline schedule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_model_equivalence import (
    build,
    make_batch,
    make_groups,
    response_token_logprobs,
    single_token_logprobs,
)

pytestmark = pytest.mark.slow

LAYOUTS: dict[str, dict[str, int]] = {
    "tp2-sp": {"tensor_parallel": 2},
    "ep2": {"expert_parallel": 2},
    "pp2": {"pipeline_parallel": 2},
    "pp2-uneven": {"pipeline_parallel": 2},
    "tp2xep2": {"tensor_parallel": 2, "expert_parallel": 2},
}
WORLD_SIZE = {"tp2-sp": 2, "ep2": 2, "pp2": 2, "pp2-uneven": 2, "tp2xep2": 4}
# A.X K1's 61 layers need an uneven split; here: the dense first layer alone on stage 0.
TRANSFORMER_OVERRIDES = {"pp2-uneven": {"num_layers_in_first_pipeline_stage": 1}}
CASES = [
    ("tiny-dense", "tp2-sp"),
    ("tiny-dense", "pp2"),
    ("tiny-moe", "tp2-sp"),
    ("tiny-moe", "ep2"),
    ("tiny-moe", "pp2"),
    ("tiny-mla-moe", "tp2-sp"),
    ("tiny-mla-moe", "ep2"),
    ("tiny-mla-moe", "tp2xep2"),
    ("tiny-mla-moe", "pp2-uneven"),
    # The Hugging Face architectures' own features under a layout each: tied embeddings and q/k
    # norms across pipeline stages, softmax top-k routing across expert ranks, Q/K/V bias and
    # partial rotary with sharded heads.
    ("tiny-qwen3", "pp2"),
    ("tiny-qwen3-moe", "ep2"),
    ("tiny-glm4-moe", "tp2-sp"),
]


def _reference(name: str, checkpoint_dir: str) -> dict[tuple[int, int], torch.Tensor]:
    """This process, alone: save the weights, return each response's log-probs run alone.

    Runs in the pytest process: the checkpoint writer starts a multiprocessing manager, which
    the (daemonic) ranks of ``run_distributed`` may not.
    """
    from megatron.core import dist_checkpointing

    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize()
    try:
        cfg, model = build(name)
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)
        model.eval()
        with torch.no_grad():
            return {
                (g.group_id, k): single_token_logprobs(model, g, k)
                for g in make_groups(seed=5, vocab_size=cfg.vocab_size)
                for k in range(len(g.responses))
            }
    finally:
        dist_platform.destroy()


def _packed_logprobs(
    name: str, checkpoint_dir: str, layout: dict[str, int], transformer_overrides: dict[str, Any]
) -> dict | None:
    """One rank of a parallel layout: load the weights, return packed-row log-probs (last PP stage)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prefpack.models.forward import model_forward
    from megatron_prefpack.platform import distributed as dist_platform

    dist_platform.initialize(**layout)
    cfg, model = build(name, transformer_overrides)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint_dir))
    model.eval()
    batch = make_batch(make_groups(seed=5, vocab_size=cfg.vocab_size), "packed")

    def forward_step(data_iterator: Any, chunk: torch.nn.Module):
        output = model_forward(chunk, next(data_iterator))

        def collect(logits: torch.Tensor, non_loss_data: bool = True):
            return response_token_logprobs(logits, batch)

        return output, collect

    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=batch.tokens.shape[1],
            micro_batch_size=batch.tokens.shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    return collected[0] if parallel_state.is_pipeline_last_stage() else None


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    refs = {}
    for name in sorted({name for name, _ in CASES}):
        checkpoint_dir = tmp_path_factory.mktemp(f"ckpt-{name}")
        refs[name] = (checkpoint_dir, _reference(name, str(checkpoint_dir)))
    return refs


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_packed_logprobs_match_single_process(references: dict, name: str, layout: str) -> None:
    checkpoint_dir, reference = references[name]
    results = run_distributed(
        _packed_logprobs,
        WORLD_SIZE[layout],
        name,
        str(checkpoint_dir),
        LAYOUTS[layout],
        TRANSFORMER_OVERRIDES.get(layout, {}),
    )
    last_stage = [r for r in results if r is not None]
    assert last_stage, "no rank returned log-probs"
    for logps in last_stage:
        assert logps.keys() == reference.keys()
        for key, ref in reference.items():
            diff = (logps[key] - ref).abs().max().item()
            assert diff <= 1e-5, f"{name} {layout} response {key}: max |diff| {diff:.3g}"
