"""Hugging Face checkpoints of the DeepSeek-V3 architecture -> this package's Megatron-Core model.

Covers DeepSeek-V3 and models built like it (A.X K1: give the key of its post-MoE norm, which
DeepSeek-V3 lacks). Three pieces, used by ``tools/convert_hf_checkpoint.py``:

* :func:`model_config_from_hf`: ``config.json`` -> :class:`ModelConfig`, refusing what Megatron-Core
  would compute differently (non-interleaved RoPE, unnormalised top-k weights, a group score
  other than the sum of the best two);
* :class:`SafetensorsCheckpoint`: lazy tensor reads from the ``*.safetensors`` shards, with
  DeepSeek's block-scaled FP8 weights (``weight_scale_inv``, 128 x 128 blocks) dequantized;
* :func:`fill_model`: copies into one rank's model chunk (any pipeline stage, any expert-parallel
  rank; tensor parallel 1) exactly the tensors it holds, so a 671B checkpoint converts on CPU
  processes that each hold a slice.

Experts may be stored per expert (``mlp.experts.{e}.gate_proj.weight``, the released
checkpoints) or fused (``mlp.experts.gate_up_proj``, transformers >= 5 ``save_pretrained``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_prefpack.models.config import MLAConfig, ModelConfig, MoEConfig, YarnConfig

FP8_BLOCK = 128
"""DeepSeek's FP8 weights carry one inverse scale per 128 x 128 block."""


class ConversionError(ValueError):
    """A checkpoint or config this converter cannot translate exactly; the message says why."""


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes ``rope_parameters``; older configs ``rope_scaling`` + ``rope_theta``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def model_config_from_hf(
    hf: Mapping[str, Any], *, post_moe_norm: bool = False, name: str = "hf"
) -> ModelConfig:
    """The :class:`ModelConfig` of a DeepSeek-V3-architecture ``config.json`` (as a dict).

    Raises :class:`ConversionError` naming the field for anything Megatron-Core computes differently."""

    def need(key: str) -> Any:
        if key not in hf:
            raise ConversionError(f"config.json: missing field {key!r}")
        return hf[key]

    if not hf.get("rope_interleave", True):
        raise ConversionError(
            "config.json: rope_interleave=false; Megatron's MLA RoPE expects interleaved weights"
        )
    if not hf.get("norm_topk_prob", True):
        raise ConversionError("config.json: norm_topk_prob=false; Megatron normalises sigmoid top-k weights")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConversionError(
            f"config.json: scoring_func={hf['scoring_func']!r}; only 'sigmoid' is supported"
        )
    top_k, groups, topk_groups = need("num_experts_per_tok"), need("n_group"), need("topk_group")
    if groups > 1 and top_k // topk_groups != 2:
        raise ConversionError(
            f"config.json: num_experts_per_tok // topk_group = {top_k} // {topk_groups} != 2: DeepSeek-V3 scores "
            "a group by its best 2 experts, Megatron-Core by its best top_k // topk_group"
        )
    rope = _rope_parameters(hf)
    yarn = None
    if rope["rope_type"] == "yarn":
        yarn = YarnConfig(
            scaling_factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast", 32.0)),
            beta_slow=float(rope.get("beta_slow", 1.0)),
            mscale=float(rope.get("mscale", 1.0)),
            mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)),
        )
    elif rope["rope_type"] != "default":
        raise ConversionError(f"config.json: rope type {rope['rope_type']!r}; 'default' or 'yarn' only")
    return ModelConfig(
        num_layers=need("num_hidden_layers"),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=need("intermediate_size"),
        num_attention_heads=need("num_attention_heads"),
        vocab_size=need("vocab_size"),
        max_position_embeddings=need("max_position_embeddings"),
        position_embedding="yarn" if yarn else "rope",
        rotary_base=float(rope["rope_theta"]),
        yarn=yarn,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mla=MLAConfig(
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_head_dim=need("qk_nope_head_dim"),
            qk_pos_emb_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
        ),
        moe=MoEConfig(
            num_experts=need("n_routed_experts"),
            top_k=top_k,
            expert_ffn_hidden_size=need("moe_intermediate_size"),
            shared_expert_ffn_hidden_size=need("moe_intermediate_size") * hf.get("n_shared_experts", 1),
            router="sigmoid_grouped",
            num_groups=groups,
            topk_groups=topk_groups,
            expert_bias=True,
            routing_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            first_k_dense=int(hf.get("first_k_dense_replace", 0)),
            post_moe_norm=post_moe_norm,
        ),
        name=name,
    )


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """``weight`` ``(out, in)`` in an FP8 dtype times its per-block inverse scales
    ``(ceil(out / block), ceil(in / block))``, as float32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return weight.float() * scale


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint directory, read one at a time.

    ``read(name)`` returns float32, FP8 weights dequantized with their ``<name>_scale_inv``.
    ``used`` collects the names read (for the caller's "ignored tensors" report)."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.directory}: no *.safetensors files")
            weight_map = {}
            for file in files:
                with safe_open(file, framework="pt") as f:
                    weight_map.update(dict.fromkeys(f.keys(), file.name))
        self.files = weight_map
        self.used: set[str] = set()
        self._open = safe_open

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``name`` as float32; with ``index``, only ``name[index]`` is read (fused experts)."""
        if name not in self.files:
            raise ConversionError(f"{self.directory}: no tensor {name!r}")
        self.used.add(name)
        with self._open(self.directory / self.files[name], framework="pt") as f:
            tensor = f.get_tensor(name) if index is None else f.get_slice(name)[index]
        scale_name = f"{name}_scale_inv"
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale_name not in self.files:
                raise ConversionError(f"{self.directory}: FP8 tensor {name!r} has no {scale_name!r}")
            return dequantize_fp8(tensor, self.read(scale_name))
        return tensor.float()


_ATTENTION = {
    "linear_q_down_proj": "q_a_proj",
    "q_layernorm": "q_a_layernorm",
    "linear_q_up_proj": "q_b_proj",
    "linear_kv_down_proj": "kv_a_proj_with_mqa",
    "kv_layernorm": "kv_a_layernorm",
    "linear_kv_up_proj": "kv_b_proj",
    "linear_proj": "o_proj",
}


def _expert_reader(ckpt: SafetensorsCheckpoint, prefix: str, expert: int) -> Callable[[str], torch.Tensor]:
    """``fc1`` / ``fc2`` of one routed expert, per-expert or fused storage."""
    fused = f"{prefix}.mlp.experts.gate_up_proj"

    def read(which: str) -> torch.Tensor:
        if fused in ckpt:
            return ckpt.read(fused if which == "fc1" else f"{prefix}.mlp.experts.down_proj", expert)
        base = f"{prefix}.mlp.experts.{expert}"
        if which == "fc1":
            return torch.cat([ckpt.read(f"{base}.gate_proj.weight"), ckpt.read(f"{base}.up_proj.weight")])
        return ckpt.read(f"{base}.down_proj.weight")

    return read


def _layer_tensor(
    ckpt: SafetensorsCheckpoint, layer: int, rest: str, expert_offset: int, post_moe_norm_key: str | None
) -> torch.Tensor:
    prefix = f"model.layers.{layer}"
    if rest == "input_layernorm.weight":
        return ckpt.read(f"{prefix}.input_layernorm.weight")
    if rest == "pre_mlp_layernorm.weight":
        return ckpt.read(f"{prefix}.post_attention_layernorm.weight")
    if (match := re.fullmatch(r"self_attention\.(\w+)\.weight", rest)) and match[1] in _ATTENTION:
        return ckpt.read(f"{prefix}.self_attn.{_ATTENTION[match[1]]}.weight")
    if match := re.fullmatch(r"mlp\.(shared_experts\.)?linear_fc([12])\.weight", rest):
        mlp = f"{prefix}.mlp.shared_experts" if match[1] else f"{prefix}.mlp"
        if match[2] == "1":  # Megatron's SwiGLU weight is [gate; up]
            return torch.cat([ckpt.read(f"{mlp}.gate_proj.weight"), ckpt.read(f"{mlp}.up_proj.weight")])
        return ckpt.read(f"{mlp}.down_proj.weight")
    if rest == "mlp.router.weight":
        return ckpt.read(f"{prefix}.mlp.gate.weight")
    if rest == "mlp.router.expert_bias":
        return ckpt.read(f"{prefix}.mlp.gate.e_score_correction_bias")
    if match := re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight", rest):
        return _expert_reader(ckpt, prefix, expert_offset + int(match[1]))(f"fc{match[2]}")
    if rest == "mlp.post_norm.weight":
        if post_moe_norm_key is None:
            raise ConversionError(
                "the model has a post-MoE norm: give its checkpoint key (post_moe_norm_key)"
            )
        return ckpt.read(post_moe_norm_key.format(layer=layer))
    raise ConversionError(f"no Hugging Face tensor is known for decoder layer parameter {rest!r}")


def fill_model(
    model: torch.nn.Module,
    ckpt: SafetensorsCheckpoint,
    *,
    post_moe_norm_key: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Copy every tensor of this rank's ``model`` chunk's state dict (a ``build_model`` GPTModel,
    tensor parallel 1) from ``ckpt``; returns how many tensors were filled.

    Layers are found by their global ``layer_number`` (any pipeline stage); local experts are
    offset by the expert-parallel rank. Shapes must match exactly. ``progress(done, total)`` is
    called after each tensor."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ConversionError("convert with tensor parallel 1 (the checkpoint reshards to any TP on load)")
    targets = {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if isinstance(tensor, torch.Tensor)  # not the ``_extra_state`` entries
    }
    layers = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    filled = 0
    for name, target in targets.items():
        if name == "embedding.word_embeddings.weight":
            source = ckpt.read("model.embed_tokens.weight")
        elif name == "decoder.final_layernorm.weight":
            source = ckpt.read("model.norm.weight")
        elif name == "output_layer.weight":
            source = ckpt.read("lm_head.weight")
        elif match := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name):
            layer = model.decoder.layers[int(match[1])]
            experts = getattr(getattr(layer.mlp, "experts", None), "local_experts", None)
            offset = parallel_state.get_expert_model_parallel_rank() * len(experts) if experts else 0
            source = _layer_tensor(ckpt, layers[int(match[1])], match[2], offset, post_moe_norm_key)
        else:
            raise ConversionError(f"no Hugging Face tensor is known for parameter {name!r}")
        if source.shape != target.shape:
            raise ConversionError(
                f"{name}: checkpoint shape {tuple(source.shape)} != model {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(source.to(target.dtype))
        filled += 1
        if progress is not None:
            progress(filled, len(targets))
    return filled
