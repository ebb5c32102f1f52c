"""Model description (`ModelConfig`) and its translation to Megatron-Core's TransformerConfig.

`ModelConfig` is a plain, readable dataclass: architecture only, no parallel layout. The parallel
layout is given to :func:`to_transformer_config`, which produces a ``TransformerConfig`` (or an
``MLATransformerConfig`` when ``mla`` is set) with the settings the prefix-shared path needs for
exactness (dropless MoE, per-token routing, unfused RoPE) and that CPU/gloo runs need.
Field names of the Megatron configs are the same in megatron-core 0.16.1 and 0.19.2.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

POSITION_EMBEDDINGS = ("rope", "yarn", "learned")
ROUTERS = ("softmax", "sigmoid_grouped")
DTYPES = ("float32", "bfloat16", "float16")


class ModelConfigError(ValueError):
    """A bad model field: ``key`` is its dotted name (``moe.top_k``; ``model.moe.top_k`` from
    :meth:`ModelConfig.from_dict`), ``reason`` says what is wrong; ``str()`` is ``key: reason``."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _check_numbers(
    obj: Any,
    prefix: str,
    at_least_one: Sequence[str] = (),
    positive: Sequence[str] = (),
    non_negative: Sequence[str] = (),
) -> None:
    """Every float field of dataclass ``obj`` is finite, and the named fields are in range
    (None = unset, not checked). Raises :class:`ModelConfigError` naming ``prefix + field``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ModelConfigError(f"{prefix}{f.name}", f"must be a finite number, got {value}")
    for names, bound, holds in (
        (at_least_one, ">= 1", lambda v: v >= 1),
        (positive, "> 0", lambda v: v > 0),
        (non_negative, ">= 0", lambda v: v >= 0),
    ):
        for name in names:
            value = getattr(obj, name)
            if value is not None and not holds(value):
                raise ModelConfigError(f"{prefix}{name}", f"must be {bound}, got {value}")


@dataclass
class MoEConfig:
    """Mixture-of-Experts block.

    ``router="softmax"``: softmax over experts, top-k. ``router="sigmoid_grouped"``
    (DeepSeek-V3 / A.X K1): sigmoid scores, experts split into ``num_groups`` groups, the best
    ``topk_groups`` groups per token are kept, top-k inside them. A group's score is the sum of
    its best ``top_k // topk_groups`` scores (Megatron-Core's rule); DeepSeek-V3's reference
    code always sums the best 2, which is the same for its top 8 of 4 groups and A.X K1's, but
    not for other ratios (``tests/test_hf_reference.py``). ``expert_bias`` enables
    aux-loss-free load balancing (a per-expert bias added to the selection scores only).
    Routing is per token and dropless (no capacity), which the exactness of packing relies on.
    """

    num_experts: int
    top_k: int
    expert_ffn_hidden_size: int
    shared_expert_ffn_hidden_size: int | None = None
    router: str = "softmax"
    num_groups: int | None = None
    topk_groups: int | None = None
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    routing_scaling_factor: float | None = None
    aux_loss_coeff: float = 0.0
    first_k_dense: int = 0
    dense_layers: list[int] | None = None
    """0-based indices of the layers with a dense MLP (Qwen3-MoE ``mlp_only_layers`` /
    ``decoder_sparse_step``, A.X K1 ``mlp_layer_types``); None = the first ``first_k_dense``."""
    post_moe_norm: bool = False
    """A.X K1: an extra RMSNorm on the MoE block's output (routed + shared), before the residual add."""
    normalize_topk: bool = True
    """``router="softmax"``: True = the top-k probabilities are renormalised to sum to 1
    (Qwen3-MoE ``norm_topk_prob: true``, Mixtral; Megatron's softmax over the top-k logits);
    False = softmax over all experts, top-k kept as they are (``norm_topk_prob: false``,
    Qwen2-MoE; Megatron's ``moe_router_pre_softmax``). ``"sigmoid_grouped"`` always
    renormalises a top-k > 1 (Megatron has no other mode), so it needs True there. A
    renormalised top-1 (weight 1.0) is refused: Megatron keeps the expert's own score."""

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming the offending ``moe.`` field."""
        _check_numbers(
            self,
            "moe.",
            at_least_one=(
                "num_experts",
                "expert_ffn_hidden_size",
                "shared_expert_ffn_hidden_size",
                "num_groups",
            ),
            positive=("routing_scaling_factor",),
            non_negative=("expert_bias_update_rate", "aux_loss_coeff", "first_k_dense"),
        )
        if self.router not in ROUTERS:
            raise ModelConfigError("moe.router", f"{self.router!r} is not one of {ROUTERS}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ModelConfigError(
                "moe.top_k", f"{self.top_k} must be in [1, num_experts={self.num_experts}]"
            )
        if self.router == "sigmoid_grouped":
            if not self.num_groups or not self.topk_groups:
                raise ModelConfigError(
                    "moe.num_groups",
                    "moe.num_groups and moe.topk_groups are required for router 'sigmoid_grouped'",
                )
            if self.num_experts % self.num_groups:
                raise ModelConfigError(
                    "moe.num_groups", f"{self.num_groups} does not divide num_experts={self.num_experts}"
                )
            if not 1 <= self.topk_groups <= self.num_groups:
                raise ModelConfigError(
                    "moe.topk_groups", f"{self.topk_groups} must be in [1, {self.num_groups}]"
                )
        if self.expert_bias and self.router != "sigmoid_grouped":
            raise ModelConfigError(
                "moe.expert_bias", "aux-loss-free expert bias needs router 'sigmoid_grouped'"
            )
        self._check_normalization()
        if self.dense_layers is not None:
            if self.first_k_dense:
                raise ModelConfigError(
                    "moe.dense_layers", "set either moe.dense_layers or moe.first_k_dense, not both"
                )
            if not isinstance(self.dense_layers, list) or not all(type(i) is int for i in self.dense_layers):
                raise ModelConfigError(
                    "moe.dense_layers", f"must be a list of layer indices, got {self.dense_layers!r}"
                )
            if len(set(self.dense_layers)) != len(self.dense_layers):
                raise ModelConfigError("moe.dense_layers", f"repeats a layer: {self.dense_layers}")

    def _check_normalization(self) -> None:
        """Megatron renormalises the top-k weights in exactly these cases; refuse the others
        rather than route with different weights than the checkpoint's model."""
        if self.router == "sigmoid_grouped" and not self.normalize_topk and self.top_k > 1:
            raise ModelConfigError(
                "moe.normalize_topk",
                "router 'sigmoid_grouped' always renormalises a top-k > 1 (needs true)",
            )
        if self.top_k == 1 and self.normalize_topk:
            # Megatron keeps the single expert's softmax/sigmoid score; a renormalised top-1 is 1.0.
            raise ModelConfigError(
                "moe.normalize_topk",
                "top_k=1 with renormalised weights (always 1.0) is not expressible in Megatron's "
                "router; set normalize_topk: false (the expert's probability) if that is the model",
            )


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, A.X K1). ``q_lora_rank=None``: no query compression."""

    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming the offending ``mla.`` field."""
        _check_numbers(
            self,
            "mla.",
            at_least_one=("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "q_lora_rank"),
        )


@dataclass
class YarnConfig:
    """YaRN RoPE scaling (used with MLA, as in DeepSeek-V3)."""

    scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming the offending ``yarn.`` field."""
        _check_numbers(
            self, "yarn.", at_least_one=("original_max_position_embeddings",), positive=("scaling_factor",)
        )


@dataclass
class Llama3RopeConfig:
    """Llama-3.1+ RoPE frequency scaling (transformers ``rope_type: llama3``): wavelengths
    longer than ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``,
    those shorter than ``original_max_position_embeddings / high_freq_factor`` are kept, and the
    ones between are interpolated smoothly."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming the offending ``llama3_rope.`` field."""
        _check_numbers(
            self,
            "llama3_rope.",
            at_least_one=("original_max_position_embeddings",),
            positive=("factor", "low_freq_factor", "high_freq_factor"),
        )
        if self.high_freq_factor <= self.low_freq_factor:
            raise ModelConfigError(
                "llama3_rope.high_freq_factor",
                f"{self.high_freq_factor} must be > low_freq_factor={self.low_freq_factor}",
            )


LORA_TARGETS = (
    "linear_qkv",
    "linear_proj",
    "linear_q_proj",
    "linear_q_down_proj",
    "linear_q_up_proj",
    "linear_kv_down_proj",
    "linear_kv_up_proj",
    "linear_fc1",
    "linear_fc2",
)
"""Megatron leaf names LoRA can adapt: standard attention (``linear_qkv``, ``linear_proj``), MLA
(``linear_q_proj`` without q compression, ``linear_q_down_proj``, ``linear_q_up_proj``,
``linear_kv_down_proj``, ``linear_kv_up_proj``, ``linear_proj``) and MLPs (``linear_fc1``,
``linear_fc2``: dense MLPs, shared experts, and routed experts with ``routed_experts``)."""


@dataclass
class LoRAConfig:
    """Low-rank adapters on the decoder's linears (``model.lora``; see :mod:`megatron_prefpack.models.lora`).

    Each adapted linear computes ``W x + (alpha / rank) * B A dropout(x)``; ``B`` starts at 0, so
    the adapted model starts as the base model. ``target_modules`` are Megatron leaf names (see
    :data:`LORA_TARGETS`); a name the model does not have (``linear_qkv`` in an MLA model) adapts
    nothing. ``routed_experts`` also adapts every routed expert's ``linear_fc1``/``linear_fc2``
    (one adapter per expert), otherwise only dense MLPs and shared experts are adapted. The
    output layer, embeddings and a reward head are never adapted.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    )
    routed_experts: bool = False

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on the adapter's output."""
        return self.alpha / self.rank

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming the offending ``lora.`` field."""
        if type(self.rank) is not int:
            raise ModelConfigError("lora.rank", f"must be an integer, got {self.rank!r}")
        _check_numbers(self, "lora.", at_least_one=("rank",), positive=("alpha",))
        if not 0 <= self.dropout < 1:
            raise ModelConfigError("lora.dropout", f"must be in [0, 1), got {self.dropout}")
        targets = self.target_modules
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ModelConfigError(
                "lora.target_modules", f"must be a non-empty list of module names, got {targets!r}"
            )
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ModelConfigError(
                "lora.target_modules", f"{unknown[0]!r} is not one of {', '.join(LORA_TARGETS)}"
            )
        if len(set(targets)) != len(targets):
            raise ModelConfigError("lora.target_modules", f"repeats a module: {targets}")
        if not isinstance(self.routed_experts, bool):
            raise ModelConfigError(
                "lora.routed_experts", f"must be true or false, got {self.routed_experts!r}"
            )
        if self.routed_experts and not {"linear_fc1", "linear_fc2"} & set(targets):
            raise ModelConfigError(
                "lora.routed_experts", "needs linear_fc1 and/or linear_fc2 in lora.target_modules"
            )


@dataclass
class ModelConfig:
    """Architecture of a GPT-style decoder (dense, MoE, MLA).

    ``position_embedding``: ``"rope"`` (standard or MLA RoPE), ``"yarn"`` (MLA only) or
    ``"learned"`` (absolute embeddings). RoPE always follows the batch's position ids
    (see :mod:`megatron_prefpack.models.rope`); ``rotary_percent < 1`` rotates the first
    ``rotary_percent * head_dim`` channels of each head with rotate-half pairing (GLM-4.5's
    ``partial_rotary_factor``) and passes the rest through; ``llama3_rope`` scales its
    frequencies as Llama 3.1+. ``attention_backend`` names the prefix-shared attention backend
    (see ``megatron_prefpack.attention``). ``lora`` adds low-rank adapters to the built model
    (:class:`LoRAConfig`; Megatron's TransformerConfig does not see it).

    Standard attention only: ``qk_layernorm`` is an RMSNorm (eps ``norm_epsilon``) over each
    query and key head before RoPE (Qwen3); ``attention_bias`` is a bias on the Q, K and V
    projections, not the output projection (Qwen2, GLM-4.5).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    position_embedding: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    yarn: YarnConfig | None = None
    llama3_rope: Llama3RopeConfig | None = None
    norm_epsilon: float = 1e-6
    swiglu: bool = True
    tie_embeddings: bool = False
    qk_layernorm: bool = False
    attention_bias: bool = False
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    attention_backend: str = "auto"
    params_dtype: str = "float32"
    init_method_std: float = 0.02
    lora: LoRAConfig | None = None
    name: str = field(default="custom", compare=False)

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` naming the offending field (sizes >= 1, floats
        finite and in range, choices known, fields that must agree agreeing)."""
        self._check_sizes()
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ModelConfigError(
                "position_embedding", f"{self.position_embedding!r} is not one of {POSITION_EMBEDDINGS}"
            )
        if self.position_embedding == "yarn" and self.mla is None:
            raise ModelConfigError("position_embedding", "'yarn' is supported with MLA only (set mla)")
        if self.position_embedding == "learned" and self.mla is not None:
            raise ModelConfigError("position_embedding", "MLA needs 'rope' or 'yarn', not 'learned'")
        if self.params_dtype not in DTYPES:
            raise ModelConfigError("params_dtype", f"{self.params_dtype!r} is not one of {DTYPES}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ModelConfigError(
                "num_query_groups", f"{groups} does not divide num_attention_heads={self.num_attention_heads}"
            )
        for section in (self.moe, self.mla, self.yarn, self.llama3_rope, self.lora):
            if section is not None:
                section.validate()
        self._check_attention_features()
        if self.moe is not None:
            self._check_moe_placement()
        if self.lora is not None and self.lora.routed_experts and self.moe is None:
            raise ModelConfigError("lora.routed_experts", "needs an MoE model (moe)")

    def _check_attention_features(self) -> None:
        if self.llama3_rope is not None and (self.position_embedding != "rope" or self.mla is not None):
            raise ModelConfigError(
                "llama3_rope", "needs position_embedding 'rope' with standard attention (no mla)"
            )
        if self.mla is None:
            return
        # MLA always normalises its compressed q and kv and has no Q/K/V projection bias.
        for name in ("qk_layernorm", "attention_bias"):
            if getattr(self, name):
                raise ModelConfigError(name, "is for standard attention; MLA does not support it")

    def _check_moe_placement(self) -> None:
        if self.moe.first_k_dense > self.num_layers:
            raise ModelConfigError(
                "moe.first_k_dense", f"{self.moe.first_k_dense} > num_layers={self.num_layers}"
            )
        outside = [i for i in self.moe.dense_layers or () if not 0 <= i < self.num_layers]
        if outside:
            raise ModelConfigError(
                "moe.dense_layers", f"layer {outside[0]} is not in [0, num_layers={self.num_layers})"
            )

    def _check_sizes(self) -> None:
        _check_numbers(
            self,
            "",
            at_least_one=(
                "num_layers",
                "hidden_size",
                "ffn_hidden_size",
                "num_attention_heads",
                "vocab_size",
                "max_position_embeddings",
                "num_query_groups",
                "kv_channels",
            ),
            positive=("rotary_base", "norm_epsilon", "init_method_std"),
        )
        if not 0 < self.rotary_percent <= 1:
            raise ModelConfigError("rotary_percent", f"must be in (0, 1], got {self.rotary_percent}")
        # Megatron derives the head size as hidden_size // num_attention_heads when it is not given.
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads} "
                "(or set kv_channels)",
            )
        if self.rotary_percent < 1 and self.mla is None:
            # Megatron and transformers both truncate head_dim * percent; refuse rather than truncate.
            head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
            rotary_dim = head_dim * self.rotary_percent
            if rotary_dim != int(rotary_dim) or int(rotary_dim) % 2:
                raise ModelConfigError(
                    "rotary_percent",
                    f"{self.rotary_percent} of head_dim={head_dim} is {rotary_dim:g} channels; "
                    "must be an even whole number",
                )

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def moe_layer_pattern(self) -> list[int]:
        """Per layer 1 (MoE) or 0 (dense), as Megatron's ``moe_layer_freq`` list."""
        if self.moe is None:
            return [0] * self.num_layers
        dense = self.moe.dense_layers
        if dense is None:
            dense = range(self.moe.first_k_dense)
        return [0 if i in dense else 1 for i in range(self.num_layers)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> ModelConfig:
        """Build from a plain mapping (e.g. a YAML section) and validate it. Raises
        :class:`ModelConfigError` with ``key`` = ``where.field`` (unknown, missing or bad)."""
        nested = {
            "moe": MoEConfig,
            "mla": MLAConfig,
            "yarn": YarnConfig,
            "llama3_rope": Llama3RopeConfig,
            "lora": LoRAConfig,
        }
        kwargs = _checked_kwargs(cls, data, where)
        for key, sub in nested.items():
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = sub(**_checked_kwargs(sub, kwargs[key], f"{where}.{key}"))
        cfg = cls(**kwargs)
        try:
            cfg.validate()
        except ModelConfigError as exc:
            raise ModelConfigError(f"{where}.{exc.key}", exc.reason) from None
        return cfg


def _checked_kwargs(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ModelConfigError(where, f"expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ModelConfigError(f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(names))})")
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise ModelConfigError(f"{where}.{missing[0]}", "required field missing")
    return dict(data)


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16`` etc."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def to_transformer_config(
    cfg: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = 1,
    sequence_parallel: bool | None = None,
    virtual_pipeline_parallel: int | None = None,
    **overrides: Any,
):
    """The Megatron-Core config for ``cfg`` under the given parallel layout.

    ``sequence_parallel`` defaults to ``tensor_parallel > 1`` (MoE with TP requires it).
    ``overrides`` are passed to the config constructor last (e.g. recompute settings).
    Returns ``MLATransformerConfig`` when ``cfg.mla`` is set, else ``TransformerConfig``.
    """
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    cfg.validate()
    dtype = torch_dtype(cfg.params_dtype)
    on_gpu = torch.cuda.is_available()
    if sequence_parallel is None:
        sequence_parallel = tensor_parallel > 1
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        qk_layernorm=cfg.qk_layernorm,
        add_bias_linear=False,
        add_qkv_bias=cfg.attention_bias,
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        sequence_parallel=sequence_parallel,
        # RoPE is applied from per-token position ids; the fused kernels take positions 0..S-1 only.
        apply_rope_fusion=False,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu and cfg.swiglu,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        # gloo point-to-point cannot batch isend/irecv; harmless on NCCL.
        batch_p2p_comm=on_gpu,
    )
    if cfg.moe is not None:
        moe = cfg.moe
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_layer_freq=cfg.moe_layer_pattern(),
            moe_router_score_function="sigmoid" if moe.router == "sigmoid_grouped" else "softmax",
            # Softmax after top-k = renormalised top-k; before = unnormalised (sigmoid ignores it).
            moe_router_pre_softmax=moe.router == "softmax" and not moe.normalize_topk,
            moe_router_num_groups=moe.num_groups if moe.router == "sigmoid_grouped" else None,
            moe_router_group_topk=moe.topk_groups if moe.router == "sigmoid_grouped" else None,
            moe_router_enable_expert_bias=moe.expert_bias,
            moe_router_bias_update_rate=moe.expert_bias_update_rate,
            moe_router_topk_scaling_factor=moe.routing_scaling_factor,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_router_dtype="fp32",
            # Dropless: a token's experts never depend on the rest of the batch.
            moe_expert_capacity_factor=None,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    if cfg.mla is None:
        return TransformerConfig(**{**kwargs, **overrides})
    mla = cfg.mla
    yarn = cfg.yarn or YarnConfig()
    kwargs.update(
        multi_latent_attention=True,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_head_dim,
        qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
        v_head_dim=mla.v_head_dim,
        qk_layernorm=True,
        rope_type="yarn" if cfg.position_embedding == "yarn" else "rope",
        rotary_base=cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
        rotary_scaling_factor=yarn.scaling_factor,
        original_max_position_embeddings=yarn.original_max_position_embeddings,
        beta_fast=yarn.beta_fast,
        beta_slow=yarn.beta_slow,
        mscale=yarn.mscale,
        mscale_all_dim=yarn.mscale_all_dim,
    )
    return MLATransformerConfig(**{**kwargs, **overrides})
