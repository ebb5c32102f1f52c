"""Megatron parameter <-> Hugging Face tensor(s), both ways, for every architecture.

A :class:`Rule` names the HF tensors one Megatron tensor (tensor parallel 1, global layer and
expert numbers) is made of, and the transform each way. An :class:`Architecture` (one module per
HF ``model_type``, transformers-style) gives ``config.json`` <-> :class:`ModelConfig` and the
rules of each decoder layer; the pieces most architectures share (norms, SwiGLU MLPs, experts,
fused QKV, MLA) are built here.

Megatron's layouts, for reference:

* SwiGLU ``linear_fc1.weight`` is ``[gate; up]`` stacked on dim 0;
* ``linear_qkv.weight`` (and its bias) is ``[groups x (q_per_group + k + v) x head_dim]`` on dim
  0, where HF has separate ``q_proj`` ``[heads x head_dim]``, ``k_proj``, ``v_proj``
  ``[groups x head_dim]``;
* local experts ``mlp.experts.local_experts.{j}`` are global expert ``ep_rank * local + j``;
  grouped experts (``performance.moe_grouped_gemm``: Transformer Engine's ``TEGroupedMLP``) name
  local expert ``j``'s weights ``mlp.experts.linear_fc1.weight{j}`` / ``linear_fc2.weight{j}``,
  each the same ``(out, in)`` tensor as the per-expert layout's, so both share the rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_prefpack.models.config import ModelConfig
from megatron_prefpack.models.hf.fields import ConversionError

Tensor = torch.Tensor


def _only(parts: list[Tensor]) -> Tensor:
    return parts[0]


def _listed(tensor: Tensor) -> list[Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of.

    ``join`` (import) gets the HF tensors in ``hf_names`` order; ``split`` (export) returns
    them in that order, exact inverses of each other (no arithmetic, only reshapes)."""

    hf_names: tuple[str, ...]
    join: Callable[[list[Tensor]], Tensor] = _only
    split: Callable[[Tensor], list[Tensor]] = _listed


def direct(name: str) -> Rule:
    return Rule((name,))


def stacked(*names: str) -> Rule:
    """Equal-sized HF tensors stacked on dim 0 (SwiGLU ``[gate; up]``)."""
    return Rule(names, lambda parts: torch.cat(parts), lambda t: list(t.chunk(len(names))))


def fused_qkv(q: str, k: str, v: str, heads: int, groups: int, head_dim: int) -> Rule:
    """Megatron's grouped ``linear_qkv`` (weight or bias) <-> separate q/k/v projections."""
    per_group = heads // groups * head_dim

    def join(parts: list[Tensor]) -> Tensor:
        qt, kt, vt = parts
        rest = qt.shape[1:]
        grouped = [qt.reshape(groups, per_group, *rest), kt.reshape(groups, head_dim, *rest)]
        grouped.append(vt.reshape(groups, head_dim, *rest))
        return torch.cat(grouped, dim=1).reshape(-1, *rest)

    def split(tensor: Tensor) -> list[Tensor]:
        rest = tensor.shape[1:]
        grouped = tensor.reshape(groups, per_group + 2 * head_dim, *rest)
        qt, kt, vt = grouped.split([per_group, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (qt, kt, vt)]

    return Rule((q, k, v), join, split)


LayerRules = dict[str, Rule]
"""Megatron name inside ``decoder.layers.{i}.`` (global experts) -> its rule."""


@dataclass(frozen=True)
class Architecture:
    """One HF ``model_type``.

    ``model_config(hf)`` reads a ``config.json`` dict (raising :class:`ConversionError` naming
    the field for anything Megatron computes differently); ``hf_config(cfg)`` is the inverse
    (the fields transformers needs, ``model_type`` and ``architectures`` included);
    ``layer_rules(cfg, layer)`` maps the Megatron tensors of decoder layer ``layer``.
    ``zeros_when_missing``: HF tensor-name suffixes transformers itself fills with zeros when a
    checkpoint lacks them (A.X K1's routing correction bias); any other missing tensor is an
    error. ``class_prefix``: ``<prefix>ForCausalLM`` / ``<prefix>ForSequenceClassification``."""

    model_type: str
    class_prefix: str
    model_config: Callable[[Mapping[str, Any]], ModelConfig]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    layer_rules: Callable[[ModelConfig, int], LayerRules]
    zeros_when_missing: tuple[str, ...] = field(default=())


# ----------------------------------------------------------------------------- shared pieces


def norms(prefix: str) -> LayerRules:
    """Pre-attention and pre-MLP RMSNorms (also under Transformer Engine's fused names)."""
    attn, mlp = (
        direct(f"{prefix}.input_layernorm.weight"),
        direct(f"{prefix}.post_attention_layernorm.weight"),
    )
    return {
        "input_layernorm.weight": attn,
        "self_attention.linear_qkv.layer_norm_weight": attn,
        "pre_mlp_layernorm.weight": mlp,
        "mlp.linear_fc1.layer_norm_weight": mlp,
    }


def swiglu(megatron: str, hf: str) -> LayerRules:
    """A SwiGLU MLP: ``{megatron}.linear_fc1/2`` <- ``{hf}.gate_proj/up_proj/down_proj``."""
    return {
        f"{megatron}.linear_fc1.weight": stacked(f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),
        f"{megatron}.linear_fc2.weight": direct(f"{hf}.down_proj.weight"),
    }


def routed_experts(num_experts: int, hf: str) -> LayerRules:
    """Per-expert SwiGLU experts ``{hf}.{e}.*`` (fused storage is read by the checkpoint reader)."""
    rules: LayerRules = {}
    for e in range(num_experts):
        rules.update(swiglu(f"mlp.experts.local_experts.{e}", f"{hf}.{e}"))
    return rules


def gqa_attention(cfg: ModelConfig, prefix: str, qk_norm: bool = False, bias: bool = False) -> LayerRules:
    """Standard (grouped-query) attention with separate q/k/v/o projections."""
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    attn = f"{prefix}.self_attn"

    def qkv(kind: str) -> Rule:
        names = (f"{attn}.{p}_proj.{kind}" for p in "qkv")
        return fused_qkv(*names, heads=heads, groups=groups, head_dim=head_dim)

    rules = {"self_attention.linear_qkv.weight": qkv("weight")}
    rules["self_attention.linear_proj.weight"] = direct(f"{attn}.o_proj.weight")
    if bias:
        rules["self_attention.linear_qkv.bias"] = qkv("bias")
    if qk_norm:
        rules["self_attention.q_layernorm.weight"] = direct(f"{attn}.q_norm.weight")
        rules["self_attention.k_layernorm.weight"] = direct(f"{attn}.k_norm.weight")
    return rules


_MLA = {
    "linear_q_down_proj": "q_a_proj",
    "q_layernorm": "q_a_layernorm",
    "linear_q_up_proj": "q_b_proj",
    "linear_q_proj": "q_proj",
    "linear_kv_down_proj": "kv_a_proj_with_mqa",
    "kv_layernorm": "kv_a_layernorm",
    "linear_kv_up_proj": "kv_b_proj",
    "linear_proj": "o_proj",
}


def mla_attention(prefix: str) -> LayerRules:
    """DeepSeek's multi-head latent attention (the weights map one to one)."""
    return {
        f"self_attention.{megatron}.weight": direct(f"{prefix}.self_attn.{hf}.weight")
        for megatron, hf in _MLA.items()
    }


# ----------------------------------------------------------------------------- model-wide


def top_level_rules(cfg: ModelConfig, reward: bool = False) -> dict[str, Rule]:
    """Embedding, final norm and output layer (``score.weight`` for a reward model; the
    embedding itself when tied, which Megatron keeps a copy of on the last pipeline stage)."""
    output = (
        "score.weight"
        if reward
        else ("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight")
    )
    return {
        "embedding.word_embeddings.weight": direct("model.embed_tokens.weight"),
        "decoder.final_layernorm.weight": direct("model.norm.weight"),
        "output_layer.weight": direct(output),
    }


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_LOCAL_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.+)")
_GROUPED_EXPERT = re.compile(r"mlp\.experts\.(linear_fc[12])\.weight(\d+)")


def _local_expert(name: str) -> tuple[int, str] | None:
    """``(local expert index, name inside the expert)`` of a layer-relative expert parameter
    name in the per-expert or the grouped layout, else None."""
    match = _LOCAL_EXPERT.fullmatch(name)
    if match is not None:
        return int(match[1]), match[2]
    match = _GROUPED_EXPERT.fullmatch(name)
    if match is not None:
        return int(match[2]), f"{match[1]}.weight"
    return None


class ModelMapping:
    """The rules of one rank's model chunk: its state-dict names -> :class:`Rule`.

    Layers are found by their global ``layer_number`` (any pipeline stage); local experts
    (per-expert or grouped names) are offset by the expert-parallel rank. Entries that are not
    weights (``_extra_state``: None, or a serialized tensor under Transformer Engine) are
    skipped. Raises :class:`ConversionError` for a parameter no rule covers."""

    def __init__(self, arch: Architecture, cfg: ModelConfig, model: torch.nn.Module, reward: bool = False):
        from megatron.core import parallel_state

        self.arch, self.cfg = arch, cfg
        self.top = top_level_rules(cfg, reward)
        self.layers = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
        self.expert_rank = parallel_state.get_expert_model_parallel_rank()
        self._rules: dict[int, LayerRules] = {}
        self.tensors = {
            name: tensor
            for name, tensor in model.state_dict(keep_vars=True).items()
            if isinstance(tensor, torch.Tensor) and not name.endswith("._extra_state")
        }
        self.num_local_experts = _num_local_experts(model)

    def rule(self, name: str) -> tuple[Rule, bool]:
        """The rule of state-dict entry ``name``, and whether it is an expert's (expert-parallel)."""
        if name in self.top:
            return self.top[name], False
        match = _LAYER.fullmatch(name)
        if match is None:
            raise ConversionError(f"no Hugging Face tensor is known for parameter {name!r}")
        layer, rest = self.layers[int(match[1])], match[2]
        expert = _local_expert(rest)
        if expert is not None:
            local, inner = expert
            rest = f"mlp.experts.local_experts.{self.expert_rank * self.num_local_experts + local}.{inner}"
        if layer not in self._rules:
            self._rules[layer] = self.arch.layer_rules(self.cfg, layer)
        if rest not in self._rules[layer]:
            raise ConversionError(
                f"no Hugging Face tensor is known for decoder layer {layer} parameter {rest!r}"
            )
        return self._rules[layer][rest], expert is not None

    def items(self) -> Iterator[tuple[str, Tensor, Rule, bool]]:
        """``(name, tensor, rule, is_expert)`` for every parameter of the chunk."""
        for name, tensor in self.tensors.items():
            yield name, tensor, *self.rule(name)


def _num_local_experts(model: torch.nn.Module) -> int:
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)  # SequentialMLP or TEGroupedMLP
        if experts is not None:
            return int(experts.num_local_experts)
    return 0
