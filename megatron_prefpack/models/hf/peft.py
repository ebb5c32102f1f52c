"""LoRA adapters of this package's Megatron model -> a PEFT adapter for the Hugging Face model.

:func:`adapter_pieces` (every rank, on its tensor-parallel-1 chunk) gives each adapter as the HF
linear(s) it adds to, through the same :class:`~.mapping.Rule` that maps the wrapped base weight:
a fused Megatron linear that is several HF linears (``linear_qkv`` -> ``q/k/v_proj``,
``linear_fc1`` -> ``gate/up_proj``) gives each of them a copy of ``lora_A`` and the rows of
``lora_B`` its weight rows come from (``Rule.split`` on ``lora_B``, whose rows are the weight's).
:func:`peft_adapter` (one process, all pieces) builds what ``PeftModel.save_pretrained`` writes:
tensors named ``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight`` and the
``adapter_config.json`` dict (``peft_type: LORA``; ``lora_alpha / r`` is Megatron's scale).

Routed experts: transformers >= 5 stores a layer's experts fused (``mlp.experts.gate_up_proj``
``(E, 2 * ffn, hidden)`` = ``[gate; up]`` rows per expert, and ``down_proj``), which PEFT adapts
through ``target_parameters`` (one ``lora.ParamWrapper`` per parameter, nested when both are
adapted: ``gate_up_proj`` inner, under ``base_layer.``). Its layout: ``lora_A`` ``(E * r, in)``
with expert ``e``'s rows at ``e * r``; ``lora_B`` ``(out, r * E)`` with expert ``e``'s column
``k`` at ``k * E + e``. PEFT's expert wrapper refuses dropout, so such an adapter says
``lora_dropout: 0`` (dropout only acts in training).

Refused (:class:`ConversionError` naming the alternative, the merged export): adapters on dense
or shared-expert MLPs of the model types in :data:`PEFT_REWRITES_MLP_TARGETS`, whose
``gate_proj``/``up_proj``/``down_proj`` targets PEFT redirects to the fused routed experts.

A reward model (``SEQ_CLS``) also carries its trained head as ``base_model.model.score.weight``
(``modules_to_save: ["score"]``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.hf.fields import ConversionError
from megatron_prefpack.models.hf.mapping import Architecture, ModelMapping
from megatron_prefpack.models.hf.safetensors_io import _PER_EXPERT

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""PEFT's prefix of every saved tensor (``PeftModel`` -> ``LoraModel`` -> the HF model)."""

PEFT_REWRITES_MLP_TARGETS = frozenset({"deepseek_v3", "qwen3_moe", "glm4_moe"})
"""Model types for which PEFT (>= 0.18 with transformers 5) turns ``gate_proj`` / ``up_proj`` /
``down_proj`` targets into the fused routed experts' ``target_parameters``, so an adapter on a
dense or shared-expert MLP would not load (checked against PEFT in tests/test_lora_peft.py)."""

REWARD_HEAD = "score"
"""The head of ``<Arch>ForSequenceClassification``; a reward model trains it with the adapters."""

_FUSED_KIND = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_WRAP_ORDER = ("gate_up_proj", "down_proj")
"""transformers' expert modules register ``gate_up_proj`` first, so PEFT wraps it innermost."""


@dataclass(frozen=True)
class AdapterPiece:
    """One adapter as it acts on one HF linear: ``weight`` (its HF weight name; per-expert names
    ``...experts.{e}.gate_proj.weight`` for routed experts) ``+= scale * lora_b @ lora_a``."""

    weight: str
    lora_a: torch.Tensor  # (rank, in)
    lora_b: torch.Tensor  # (out, rank)


def _adapted_linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(state-dict prefix, module)`` of every LoRA-wrapped linear of the chunk."""
    from megatron_prefpack.models.lora import LoRALinear

    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_pieces(
    model: torch.nn.Module,
    arch: Architecture,
    cfg: ModelConfig,
    *,
    reward: bool = False,
    replicated: bool = True,
    experts: bool = True,
) -> tuple[list[AdapterPiece], dict[str, torch.Tensor]]:
    """This tensor-parallel-1 chunk's adapters as :class:`AdapterPiece` (detached float32 copies),
    and the full tensors a reward model's adapter carries (its head, ``score.weight``, on the last
    stage). ``replicated`` / ``experts``: whether to give the non-expert / expert adapters (one
    rank of a group holding the same tensors should). Raises :class:`ConversionError` for an
    adapter no rule maps."""
    mapping = ModelMapping(arch, cfg, model, reward)
    pieces: list[AdapterPiece] = []
    for name, module in _adapted_linears(model):
        rule, is_expert = mapping.rule(f"{name}.weight")
        if not (experts if is_expert else replicated):
            continue
        lora_a, lora_b = module.lora_A.detach().float(), module.lora_B.detach().float()
        for hf_name, rows in zip(rule.hf_names, rule.split(lora_b), strict=True):
            pieces.append(AdapterPiece(hf_name, lora_a.clone(), rows.clone()))
    full: dict[str, torch.Tensor] = {}
    if reward and replicated and getattr(model, "post_process", False):
        (hf_name,) = mapping.top["output_layer.weight"].hf_names
        full[hf_name] = model.output_layer.weight.detach().float().clone()
    return pieces, full


def _module(weight: str) -> str:
    if not weight.endswith(".weight"):
        raise ConversionError(f"{weight}: an adapter acts on a linear's weight, not on this tensor")
    return weight.removesuffix(".weight")


def _fused_experts(pieces: list[AdapterPiece]) -> dict[tuple[str, str], dict[int, tuple[torch.Tensor, ...]]]:
    """``(experts module, gate_up_proj | down_proj)`` -> expert -> ``(lora_A, lora_B)`` in the fused
    parameter's rows (``lora_B`` of ``gate_up_proj`` is ``[gate; up]``, as transformers stores it)."""
    halves: dict[tuple[str, str, int], dict[str, AdapterPiece]] = defaultdict(dict)
    for piece in pieces:
        match = _PER_EXPERT.fullmatch(piece.weight)
        halves[match[1], _FUSED_KIND[match[3]], int(match[2])][match[3]] = piece
    fused: dict[tuple[str, str], dict[int, tuple[torch.Tensor, ...]]] = defaultdict(dict)
    for (module, kind, expert), parts in halves.items():
        ordered = [parts[p] for p in ("gate_proj", "up_proj", "down_proj") if p in parts]
        if kind == "gate_up_proj" and len(ordered) != 2:
            raise ConversionError(f"{module}.{expert}: an adapter on gate_proj needs one on up_proj too")
        fused[module, kind][expert] = (ordered[0].lora_a, torch.cat([p.lora_b for p in ordered]))
    return fused


def _expert_tensors(pieces: list[AdapterPiece], num_experts: int) -> dict[str, torch.Tensor]:
    """PEFT ``ParamWrapper`` tensors of the fused routed experts (layout: the module docstring)."""
    fused = _fused_experts(pieces)
    tensors: dict[str, torch.Tensor] = {}
    for (module, kind), per_expert in sorted(fused.items()):
        if sorted(per_expert) != list(range(num_experts)):
            raise ConversionError(
                f"{module}.{kind}: adapters for experts {sorted(per_expert)}, expected all {num_experts}"
            )
        lora_a = torch.cat([per_expert[e][0] for e in range(num_experts)])
        lora_b = torch.stack([per_expert[e][1] for e in range(num_experts)], dim=-1).flatten(1)
        inner = kind == _WRAP_ORDER[0] and (module, _WRAP_ORDER[1]) in fused
        path = f"{PREFIX}{module}.{'base_layer.' if inner else ''}"
        tensors[f"{path}lora_A.weight"], tensors[f"{path}lora_B.weight"] = lora_a, lora_b
    return tensors


def peft_adapter(
    pieces: list[AdapterPiece],
    full: dict[str, torch.Tensor],
    arch: Architecture,
    cfg: ModelConfig,
    *,
    reward: bool = False,
    base_model: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors and ``adapter_config.json`` from every rank's pieces (``cfg.lora``:
    rank, alpha, dropout). ``base_model``: ``base_model_name_or_path``. Raises
    :class:`ConversionError` for an adapter PEFT cannot load onto ``arch``'s HF model."""
    lora = cfg.lora
    if lora is None:
        raise ConversionError("the model has no LoRA adapters (model.lora is not set)")
    expert_pieces = [p for p in pieces if _PER_EXPERT.fullmatch(p.weight)]
    linear_pieces = [p for p in pieces if not _PER_EXPERT.fullmatch(p.weight)]
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for piece in linear_pieces:
        module = _module(piece.weight)
        targets.add(module.rsplit(".", 1)[-1])
        tensors[f"{PREFIX}{module}.lora_A.weight"] = piece.lora_a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = piece.lora_b
    rewritten = sorted(targets & set(_FUSED_KIND))
    if arch.model_type in PEFT_REWRITES_MLP_TARGETS and rewritten:
        raise ConversionError(
            f"model.lora.target_modules adapts dense / shared-expert MLPs ({', '.join(rewritten)}), which "
            f"PEFT redirects to the routed experts for model_type {arch.model_type}, so it would not load "
            "them; export the merged model instead (prefpack merge-lora, or this tool without --peft-adapter)"
        )
    parameters: list[str] = []
    if expert_pieces:
        tensors.update(_expert_tensors(expert_pieces, cfg.moe.num_experts))
        kinds = {_FUSED_KIND[_PER_EXPERT.fullmatch(p.weight)[3]] for p in expert_pieces}
        parameters = [f"mlp.experts.{kind}" for kind in _WRAP_ORDER if kind in kinds]
    tensors.update({f"{PREFIX}{name}": tensor for name, tensor in full.items()})
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0 if parameters else lora.dropout,
        "target_modules": sorted(targets) or None,
        "target_parameters": parameters or None,
        "modules_to_save": [REWARD_HEAD] if reward else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return tensors, config
