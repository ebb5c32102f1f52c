"""Shared checks of the Hugging Face import/export tests: random weights, log-probs of each
response run alone through transformers vs this package's packed rows, safetensors contents."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.test_model_equivalence import make_batch, make_groups, response_token_logprobs, single_batch


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (norms around 1), the routing correction bias included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(noise * (0.5 if "norm" in name else 0.1) + ("norm" in name))


def hf_logprobs(model: torch.nn.Module, vocab_size: int) -> dict:
    """Each response's per-token log-probs with prompt + response run alone through HF."""
    expected = {}
    with torch.no_grad():
        for group in make_groups(seed=3, vocab_size=vocab_size):
            for k in range(len(group.responses)):
                alone = single_batch(group, k)
                logits = model(input_ids=alone.tokens).logits
                expected[(group.group_id, k)] = response_token_logprobs(logits, alone)[(group.group_id, k)]
    return expected


def packed_logprobs(model: torch.nn.Module, vocab_size: int) -> dict:
    from megatron_prefpack.models.forward import model_forward

    batch = make_batch(make_groups(seed=3, vocab_size=vocab_size), "packed")
    with torch.no_grad():
        return response_token_logprobs(model_forward(model.eval(), batch), batch)


def assert_close(packed: dict, expected: dict, tol: float = 1e-5) -> None:
    assert packed.keys() == expected.keys()
    for key, reference in expected.items():
        diff = (packed[key] - reference).abs().max().item()
        assert diff <= tol, f"response {key}: max |diff| {diff:.3g}"


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
