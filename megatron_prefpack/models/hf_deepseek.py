"""Hugging Face checkpoints of the DeepSeek-V3 architecture -> this package's Megatron-Core model.

Covers DeepSeek-V3 and models built like it (A.X K1: give the key of its post-MoE norm, which
DeepSeek-V3 lacks). Three pieces, used by ``tools/convert_hf_checkpoint.py``:

* :func:`read_model_config` / :func:`model_config_from_hf`: ``config.json`` -> :class:`ModelConfig`,
  refusing what Megatron-Core would compute differently (non-interleaved RoPE, unnormalised
  top-k weights, a group score other than the sum of the best two);
* :class:`SafetensorsCheckpoint`: lazy tensor reads from the ``*.safetensors`` shards, with
  DeepSeek's block-scaled FP8 weights (``weight_scale_inv``, 128 x 128 blocks) dequantized;
* :func:`fill_model`: copies into one rank's model chunk (any pipeline stage, any expert-parallel
  rank; tensor parallel 1) exactly the tensors it holds, so a 671B checkpoint converts on CPU
  processes that each hold a slice.

Experts may be stored per expert (``mlp.experts.{e}.gate_proj.weight``, the released
checkpoints) or fused (``mlp.experts.gate_up_proj``, transformers >= 5 ``save_pretrained``).

Every problem with the files (missing, unreadable, truncated or corrupt, inconsistent with each
other or with the model) raises :class:`ConversionError` whose message starts with the file.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_prefpack.data.json_files import read_json, read_json_object
from megatron_prefpack.models.config import MLAConfig, ModelConfig, MoEConfig, YarnConfig

FP8_BLOCK = 128
"""DeepSeek's FP8 weights carry one inverse scale per 128 x 128 block."""


class ConversionError(ValueError):
    """A checkpoint or config this converter cannot translate exactly; the message says why."""


_REQUIRED = object()


def _field(
    section: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED, where: str = ""
) -> Any:
    """``section[key]`` checked to be a ``kind`` (an int is a valid float; a bool is neither),
    or ``default`` when absent and one is given (``None`` is passed through)."""
    value = section.get(key, default)
    if value is _REQUIRED:
        raise ConversionError(f"missing field {where}{key!r}")
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ConversionError(f"field {where}{key!r}: expected {kind.__name__}, got {value!r}")
    return value


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes ``rope_parameters``; older configs ``rope_scaling`` + ``rope_theta``."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ConversionError(f"field {key!r}: expected an object, got {params!r}")
    params = dict(params)
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _yarn(rope: Mapping[str, Any]) -> YarnConfig:
    def get(key: str, default: Any = _REQUIRED) -> float:
        return _field(rope, key, float, default, where="rope_parameters.")

    return YarnConfig(
        scaling_factor=get("factor"),
        original_max_position_embeddings=_field(
            rope, "original_max_position_embeddings", int, where="rope_parameters."
        ),
        beta_fast=get("beta_fast", 32.0),
        beta_slow=get("beta_slow", 1.0),
        mscale=get("mscale", 1.0),
        mscale_all_dim=get("mscale_all_dim", 0.0),
    )


def model_config_from_hf(
    hf: Mapping[str, Any], *, post_moe_norm: bool = False, name: str = "hf"
) -> ModelConfig:
    """The :class:`ModelConfig` of a DeepSeek-V3-architecture ``config.json`` (as a dict).

    Raises :class:`ConversionError` naming the field when one is missing or of the wrong type, and
    for anything Megatron-Core computes differently. Ranges are checked by ``ModelConfig.validate``."""

    def need(key: str, default: Any = _REQUIRED) -> int:
        return _field(hf, key, int, default)

    if not _field(hf, "rope_interleave", bool, True):
        raise ConversionError("rope_interleave=false; Megatron's MLA RoPE expects interleaved weights")
    if not _field(hf, "norm_topk_prob", bool, True):
        raise ConversionError("norm_topk_prob=false; Megatron normalises sigmoid top-k weights")
    if (scoring := _field(hf, "scoring_func", str, "sigmoid")) != "sigmoid":
        raise ConversionError(f"scoring_func={scoring!r}; only 'sigmoid' is supported")
    top_k, groups, topk_groups = need("num_experts_per_tok"), need("n_group"), need("topk_group")
    if topk_groups < 1:
        raise ConversionError(f"topk_group={topk_groups}; must be >= 1")
    if groups > 1 and top_k // topk_groups != 2:
        raise ConversionError(
            f"num_experts_per_tok // topk_group = {top_k} // {topk_groups} != 2: DeepSeek-V3 scores "
            "a group by its best 2 experts, Megatron-Core by its best top_k // topk_group"
        )
    rope = _rope_parameters(hf)
    if rope["rope_type"] not in ("default", "yarn"):
        raise ConversionError(f"rope type {rope['rope_type']!r}; 'default' or 'yarn' only")
    yarn = _yarn(rope) if rope["rope_type"] == "yarn" else None
    return ModelConfig(
        num_layers=need("num_hidden_layers"),
        hidden_size=need("hidden_size"),
        ffn_hidden_size=need("intermediate_size"),
        num_attention_heads=need("num_attention_heads"),
        vocab_size=need("vocab_size"),
        max_position_embeddings=need("max_position_embeddings"),
        position_embedding="yarn" if yarn else "rope",
        rotary_base=_field(rope, "rope_theta", float, where="rope_parameters."),
        yarn=yarn,
        norm_epsilon=_field(hf, "rms_norm_eps", float, 1e-6),
        tie_embeddings=_field(hf, "tie_word_embeddings", bool, False),
        mla=MLAConfig(
            q_lora_rank=need("q_lora_rank", None),
            kv_lora_rank=need("kv_lora_rank"),
            qk_head_dim=need("qk_nope_head_dim"),
            qk_pos_emb_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
        ),
        moe=MoEConfig(
            num_experts=need("n_routed_experts"),
            top_k=top_k,
            expert_ffn_hidden_size=need("moe_intermediate_size"),
            shared_expert_ffn_hidden_size=need("moe_intermediate_size") * need("n_shared_experts", 1),
            router="sigmoid_grouped",
            num_groups=groups,
            topk_groups=topk_groups,
            expert_bias=True,
            routing_scaling_factor=_field(hf, "routed_scaling_factor", float, 1.0),
            first_k_dense=need("first_k_dense_replace", 0),
            post_moe_norm=post_moe_norm,
        ),
        name=name,
    )


def read_model_config(directory: str | Path, *, post_moe_norm: bool = False) -> ModelConfig:
    """The :class:`ModelConfig` of ``directory/config.json`` (named after ``directory``).

    Raises :class:`ConversionError` ``"<path>: reason"`` (``<path>:<line>:`` for invalid JSON)
    when the file is missing, unreadable, not a JSON object, or not translatable exactly."""
    path = Path(directory) / "config.json"
    hf = read_json_object(path, ConversionError)
    try:
        cfg = model_config_from_hf(hf, post_moe_norm=post_moe_norm, name=Path(directory).name)
        cfg.validate()
    except ValueError as err:
        raise ConversionError(f"{path}: {err}") from err
    return cfg


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """``weight`` ``(out, in)`` in an FP8 dtype times its per-block inverse scales
    ``(ceil(out / block), ceil(in / block))``, as float32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return weight.float() * scale


INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def _shard(path: Path) -> Iterator[Any]:
    """``safe_open(path)``; a missing, unreadable, truncated or corrupt file (also when only a
    tensor read finds it so) raises :class:`ConversionError` ``"<path>: reason"``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except FileNotFoundError as err:
        raise ConversionError(f"{path}: no such file") from err
    except (SafetensorError, OSError) as err:
        raise ConversionError(f"{path}: unreadable safetensors file ({err})") from err


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of ``model.safetensors.index.json``."""
    content = read_json(index, ConversionError)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ConversionError(f"{index}: needs a 'weight_map' object of tensor name -> file name")
    return weight_map


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint directory, read one at a time.

    ``read(name)`` returns float32, FP8 weights dequantized with their ``<name>_scale_inv``.
    ``used`` collects the names read (for the caller's "ignored tensors" report).

    Construction reads every shard's header (not its tensors) and checks that each tensor of
    ``model.safetensors.index.json`` is in the shard the index names, so a missing, truncated
    or corrupt shard or a wrong index fails here, on every rank alike, before any work. Each
    failure raises :class:`ConversionError` starting with the file."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            self.files = _read_index(index)
            self._source = str(index)
            self._check_shards()
        else:
            self.files = self._scan()
            self._source = f"{self.directory}/*.safetensors"
        self.used: set[str] = set()

    def _scan(self) -> dict[str, str]:
        """Tensor name -> file name over every ``*.safetensors`` file of the directory."""
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.directory}: no *.safetensors files (and no {INDEX_FILE})")
        weight_map: dict[str, str] = {}
        for file in files:
            with _shard(file) as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
        return weight_map

    def _check_shards(self) -> None:
        """Every shard the index names opens, and holds the tensors the index places in it."""
        expected: dict[str, set[str]] = {}
        for name, file in self.files.items():
            expected.setdefault(file, set()).add(name)
        for file, names in sorted(expected.items()):
            with _shard(self.directory / file) as f:
                missing = names.difference(f.keys())
            if missing:
                raise ConversionError(
                    f"{self.directory / file}: has no tensor {min(missing)!r}, which {INDEX_FILE} "
                    f"places there ({len(missing)} such tensors)"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``name`` as float32; with ``index``, only ``name[index]`` is read (fused experts)."""
        if name not in self.files:
            raise ConversionError(f"{self._source}: no entry for tensor {name!r}")
        self.used.add(name)
        path = self.directory / self.files[name]
        with _shard(path) as f:
            if index is None:
                tensor = f.get_tensor(name)
            else:
                tensor_slice = f.get_slice(name)
                if not 0 <= index < tensor_slice.get_shape()[0]:
                    raise ConversionError(
                        f"{path}: tensor {name!r} of shape {tensor_slice.get_shape()} has no entry {index}"
                    )
                tensor = tensor_slice[index]
        scale_name = f"{name}_scale_inv"
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale_name not in self.files:
                raise ConversionError(f"{self._source}: FP8 tensor {name!r} has no {scale_name!r}")
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
