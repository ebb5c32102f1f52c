"""The training config: one YAML file, nested dataclasses behind it, command-line overrides.

A config file has one mapping per section (``run``, ``data``, ``model``, ``parallel``,
``performance``, ``ddp``, ``optimizer``, ``objective``, ``reference``, ``checkpoint``); every key is optional except
``data.path``. ``performance`` and ``ddp`` carry Megatron's own speed and memory settings under
their Megatron names. Overrides use dotted keys, ``--set optimizer.lr=1e-4`` or positional
``optimizer.lr=1e-4``, and are parsed with the field's type (``null`` means None).

The ``model`` section names a preset and/or any :class:`~megatron_prefpack.models.ModelConfig`
field (``model.preset: tiny-moe`` plus ``model.num_layers: 4`` = the preset with 4 layers).

Every error is a :class:`ConfigError` naming where the value came from and the dotted key:
the config file and line (``demo.yaml:12: optimizer.lrr: unknown key (did you mean 'lr'?)``)
or the override (``override 'optimizer.lr=inf': optimizer.lr: must be a finite number > 0,
got inf``). Every number must be finite; ranges are checked before any work.
:func:`check_parallel_layout` checks the parallel layout against the world size and model
once both are known (at start-up of ``prefpack train``). :func:`config_from_yaml` reads the
config a checkpoint stored and :func:`resume_changes` says what a resume may change.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from megatron_prefpack.losses.dpo import DPOConfig
from megatron_prefpack.models.config import ModelConfigError


class ConfigError(ValueError):
    """A bad config: the message names the file, line (when known) and dotted key."""


@dataclass
class RunConfig:
    """Where outputs go and how long to train."""

    dir: str = "runs/default"
    """Run directory: ``metrics.jsonl``, TensorBoard events, default checkpoint dir."""
    train_steps: int = 100
    log_interval: int = 1
    eval_interval: int = 0
    """Evaluate on the held-out split every N steps (0: only before and after training)."""
    eval_batches: int = 0
    """Global batches per evaluation (0: the whole held-out split)."""
    seed: int = 1234
    tensorboard: bool = True
    """Write TensorBoard events when ``tensorboard`` is installed."""
    max_nonfinite_steps: int = 3
    """An optimizer step whose loss or grad norm is not finite is skipped (no update); this many
    such steps in a row stop the run with a non-zero exit naming the step."""
    timeout_minutes: float = 30.0
    """Collective timeout: a hung or stalled peer ends the job (non-zero exit) after this long."""
    progress_bar: bool | Literal["auto"] = "auto"
    """A tqdm progress bar (step, loss, ETA) on rank 0's stderr; ``auto``: only when stderr is
    a terminal (never in CI or batch jobs). Log lines go to stdout either way, whole."""
    wandb_project: str | None = None
    """Also log to Weights & Biases, in this project (None: no W&B; ``WANDB_PROJECT`` alone
    does not turn it on). Rank 0 only; the run config is the W&B config; a resumed run
    continues the W&B run whose id ``<run.dir>/wandb_run_id`` holds. Needs ``wandb``."""
    wandb_entity: str | None = None
    """W&B team or user (None: ``WANDB_ENTITY`` or the account's default)."""
    wandb_name: str | None = None
    """W&B run name (None: ``WANDB_NAME`` or a generated one)."""
    wandb_mode: Literal["online", "offline"] | None = None
    """``offline`` writes the run locally for ``wandb sync`` (None: ``WANDB_MODE``, else online)."""
    wandb_dir: str | None = None
    """Where W&B writes its files (None: ``WANDB_DIR``, else ``run.dir``)."""


@dataclass
class DataConfig:
    """The preprocessed dataset and how it becomes rows. Batch sizes count rows."""

    path: str = ""
    """Preprocessed group dataset directory (``prefpack preprocess --output``)."""
    eval_fraction: float = 0.0
    """Held-out fraction; a group is held out by a hash of its group id (deterministic)."""
    seq_len: int = 1024
    layout: Literal["prefpack", "duplicated", "unpacked"] = "prefpack"
    sort_by_length: bool = False
    """Sort groups by length inside each packing window (fewer pad tokens, less shuffled)."""
    micro_batch_size: int = 1
    global_batch_size: int = 8
    skip_too_long: bool = False
    """Drop (and count) groups longer than a row instead of failing."""


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism is what is left of the world size."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    first_stage_layers: int | None = None
    """Layers on the first pipeline stage when they do not split evenly (A.X K1 and
    DeepSeek-V3 have 61): the embedding's stage can take fewer. None = an even share."""
    last_stage_layers: int | None = None
    """Layers on the last pipeline stage (it also holds the output layer and the loss)."""
    context: int = 1
    expert: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    pipeline_layout: str | None = None
    """Megatron's ``pipeline_model_parallel_layout``: the layers of every (virtual) stage, e.g.
    ``"Et*3|(tttt|)*14|ttL"`` (``E`` embedding, ``t`` a transformer layer, ``L`` output layer and
    loss, ``|`` a stage boundary). Replaces ``first_stage_layers``/``last_stage_layers``."""


@dataclass
class OptimizerConfig:
    """Adam with decoupled weight decay and a warmup + decay schedule (steps = optimizer steps)."""

    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    decay_steps: int | None = None
    """Steps over which lr decays to ``min_lr`` (None: ``run.train_steps``)."""
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    use_precision_aware_optimizer: bool = False
    """Megatron's precision-aware optimizer (Transformer Engine's FusedAdam, GPU): Adam moments
    kept in ``exp_avg_dtype`` / ``exp_avg_sq_dtype``."""
    exp_avg_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    exp_avg_sq_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    optimizer_cpu_offload: bool = False
    """Keep ``optimizer_offload_fraction`` of the optimizer state (and its step) on the CPU
    (Megatron's HybridDeviceOptimizer; GPU, distributed optimizer)."""
    optimizer_offload_fraction: float = 1.0


RECOMPUTE_MODULES = ("core_attn", "mla_up_proj", "mlp", "moe", "moe_act", "shared_experts", "layernorm")


@dataclass
class PerformanceConfig:
    """Speed and memory settings of Megatron's ``TransformerConfig``, under Megatron's names.

    None of them changes what is computed (FP8 changes its precision): a run may resume with
    other values. What needs a GPU, Transformer Engine or DeepEP is refused where they are
    missing (:func:`check_config`). Kept off always: fused RoPE (it reads positions 0..S-1,
    not the packed position ids) and Megatron's fused masked softmax (the prefix-shared
    attention owns the mask)."""

    recompute_granularity: Literal["full", "selective"] | None = None
    """``full``: recompute whole layers (``recompute_method`` and ``recompute_num_layers``);
    ``selective``: recompute ``recompute_modules`` only."""
    recompute_method: Literal["uniform", "block"] | None = None
    """``uniform``: layers in chunks of ``recompute_num_layers``, each chunk's input kept;
    ``block``: the first ``recompute_num_layers`` layers of each pipeline stage recomputed."""
    recompute_num_layers: int | None = None
    recompute_modules: list[str] | None = None
    """Selective recompute: any of ``core_attn``, ``mla_up_proj``, ``mlp``, ``moe``,
    ``moe_act``, ``shared_experts``, ``layernorm`` (None: Megatron's default ``[core_attn]``)."""
    moe_grouped_gemm: bool = False
    """All local experts in one grouped GEMM (Transformer Engine's ``TEGroupedMLP``); its
    checkpoints are interchangeable with the per-expert layout."""
    moe_permute_fusion: bool = False
    """Transformer Engine's fused token permutation."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather", "flex"] = "alltoall"
    """``flex``: DeepEP (``deep_ep`` on a GPU)."""
    moe_shared_expert_overlap: bool = False
    """Run the shared expert on a side stream while tokens are dispatched (GPU, alltoall)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 GEMMs through Transformer Engine's layers (GPU, Hopper or newer)."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with GEMMs (Transformer Engine userbuffers; GPU,
    tensor > 1 with sequence parallel)."""
    gradient_accumulation_fusion: bool = False
    """Weight gradients accumulated straight into the fp32 main-grad buffer by the GEMM (GPU;
    apex's ``fused_weight_gradient_mlp_cuda``, which Megatron's own linear layers need)."""


@dataclass
class DDPConfig:
    """Megatron ``DistributedDataParallelConfig`` settings, under Megatron's names."""

    overlap_grad_reduce: bool = False
    """Reduce gradient buckets while the backward pass still runs."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: all-gather updated parameters bucket by bucket during
    the next forward pass (needs ``overlap_grad_reduce``)."""
    bucket_size: int | None = None
    """Parameters per gradient bucket (None: Megatron's default)."""
    grad_reduce_in_fp32: bool = True
    """Keep and reduce gradients in fp32 (bf16/fp16 models)."""


@dataclass
class RMOptions:
    """Reward-model options (see :mod:`megatron_prefpack.losses.reward`)."""

    center_coefficient: float = 0.0
    """Weight of the ``(r_i + r_j)^2`` reward-centering term."""
    head_init_std: float | None = None
    """Init std of the reward head (None: ``1/sqrt(hidden + 1)``)."""


@dataclass
class SFTOptions:
    """Multi-response SFT options (see :mod:`megatron_prefpack.losses.sft`)."""

    reduction: Literal["token", "response"] = "token"
    responses: Literal["all", "first"] = "all"
    """``first``: train on each group's first response only (the chosen one of a pair)."""
    response_weights: list[float] | None = None
    """Loss weight of each group's response ``k`` (e.g. ``[1.0, 0.5]``: thinking answer 0, plain
    answer 1); the count the loss is divided by stays unweighted. Needs ``responses: all`` and a
    weight for every response index of the data; adds ``loss/response_<k>`` to the logs."""


@dataclass
class ObjectiveConfig:
    type: Literal["dpo", "rm", "sft"] = "dpo"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RMOptions = field(default_factory=RMOptions)
    sft: SFTOptions = field(default_factory=SFTOptions)


@dataclass
class ReferenceConfig:
    """Reference log-probs for DPO: precomputed (``offline``), a frozen model in the job
    (``online``), or, for a LoRA model (``model.lora``), the policy itself with its adapters
    switched off (``base``: no second copy, no offline pass)."""

    mode: Literal["none", "offline", "online", "base"] = "none"
    path: str | None = None
    """Offline: the ``prefpack ref-logprobs --output`` file."""
    load: str | None = None
    """Online: checkpoint of the reference model (None: the policy's starting weights)."""


@dataclass
class CheckpointConfig:
    load: str | None = None
    """Checkpoint directory (a ``latest`` pointer or an iteration dir) to start from."""
    load_optimizer: bool = True
    """False: take weights only and start a fresh run (step 0, new optimizer), e.g. SFT -> DPO."""
    save: str | None = None
    """Where to save (None: ``<run.dir>/checkpoints``)."""
    interval: int = 0
    """Save every N steps (0: only at the end and on SIGTERM)."""
    keep: int = 2
    """Keep the newest N checkpoints (0: keep all)."""
    keep_best: int = 0
    """Also keep the N checkpoints with the best held-out ``best_metric`` (0: off). Needs a
    held-out split (``data.eval_fraction``); with it on, every evaluation during training is
    followed by a save, so each evaluated step has its checkpoint, which records the
    evaluation. Pruning keeps the newest ``keep`` and these; ``<save>/best.json`` lists them."""
    best_metric: str = "loss"
    """The held-out metric that ranks checkpoints: a name the objective evaluates
    (``loss``, ``rewards/accuracies``, ...; checked at start-up)."""
    best_mode: Literal["min", "max"] | None = None
    """Whether lower or higher ``best_metric`` is better; None only for ``loss`` (min)."""
    auto_resume: bool = True
    """When the save dir already holds a complete checkpoint, continue from the newest one
    (weights, optimizer, schedule, data position, RNG) instead of ``load``: a requeued or
    resubmitted Slurm job carries on where the last one stopped. False: always start from
    ``load``."""


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    """A preset name (`preset: tiny-moe`) and/or `ModelConfig` fields, see :func:`model_config`."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    source: str = field(default="<defaults>", compare=False)
    """The config file this was loaded from (for error messages); not a config key."""
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    """Dotted key -> where its value was set: ``file:line`` or ``override 'key=value'``, in
    the order they were set (overrides last); not a config key."""

    @property
    def save_dir(self) -> Path:
        return Path(self.checkpoint.save or Path(self.run.dir) / "checkpoints")


_NOT_KEYS = {"source", "origins"}


# ----------------------------------------------------------------------------- parsing


def _origin(origins: dict[str, str], keys: Iterable[str], fallback: str) -> str:
    """Where the value of ``keys`` came from: the origin of the one set last, else ``fallback``."""
    rank = {key: i for i, key in enumerate(origins)}
    given = [key for key in keys if key in rank]
    return origins[max(given, key=rank.__getitem__)] if given else fallback


def _where(origins: dict[str, str], key: str, fallback: str) -> str:
    return f"{_origin(origins, [key], fallback)}: {key}"


def _yaml_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML file."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_yaml_lines(value_node, key + "."))
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML or command-line ``value`` to the field type ``tp``.

    Strings are parsed as YAML scalars first (so ``--set a.b=3`` gives an int). Ints are
    accepted for floats; nothing else is converted silently."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is Any:
        return value
    if origin in (dict, list, tuple) or tp in (dict, list, tuple):
        container = origin or tp
        if not isinstance(value, container):
            raise ConfigError(f"{where}: expected a {container.__name__}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"{where}: unknown key{hint}")


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if inner else None
    return None


def _checked(cls: type, mapping: Any, prefix: str, origins: dict[str, str], source: str) -> dict[str, Any]:
    """Type-check ``mapping`` against the fields of dataclass ``cls``; nested dataclass fields
    given as mappings are checked recursively (and stay mappings). Returns the coerced mapping.
    Errors name ``origins[key]``, else ``source``."""
    if not isinstance(mapping, dict):
        where = _where(origins, prefix.rstrip("."), source) if prefix else source
        raise ConfigError(f"{where}: expected a mapping of keys, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS]
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        where = _where(origins, dotted, source)
        if key not in known:
            raise _unknown_key(where, str(key), known)
        nested = _dataclass_type(hints[key])
        if nested is not None and isinstance(value, dict):
            out[key] = _checked(nested, value, dotted + ".", origins, source)
        elif nested is not None and value is not None:
            raise ConfigError(f"{where}: expected a mapping of {nested.__name__} fields, got {value!r}")
        elif nested is None and key == "model" and cls is TrainConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of model fields, got {value!r}")
            out[key] = value
        else:
            out[key] = coerce(value, hints[key], where)
    return out


def _merged(obj: Any, values: dict[str, Any], prefix: str, origins: dict[str, str], source: str) -> Any:
    """A copy of dataclass ``obj`` with checked ``values`` applied (frozen dataclasses too);
    a ``ValueError`` from the dataclass's own validation names the section."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        current = getattr(obj, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            changes[key] = _merged(current, value, f"{prefix}{key}.", origins, source)
        elif isinstance(value, dict) and isinstance(current, dict):
            changes[key] = {**current, **value}
        else:
            changes[key] = value
    try:
        return dataclasses.replace(obj, **changes)
    except ValueError as err:
        section = prefix.rstrip(".")
        raise ConfigError(f"{_where(origins, section, source)}: {err}") from None


def _apply(cfg: TrainConfig, mapping: Any, origins: dict[str, str], source: str) -> TrainConfig:
    """``cfg`` with ``mapping`` (from ``source``, keys set at ``origins``) applied; the keys of
    ``origins`` become the newest in ``cfg.origins``."""
    merged = _merged(cfg, _checked(TrainConfig, mapping, "", origins, source), "", origins, source)
    kept = {key: where for key, where in cfg.origins.items() if key not in origins}
    return dataclasses.replace(merged, origins=kept | origins)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _dotted_keys(key: str, value: Any) -> Iterator[str]:
    """``key`` and, when ``value`` is a mapping, the dotted keys inside it."""
    yield key
    if isinstance(value, dict):
        for sub, sub_value in value.items():
            yield from _dotted_keys(f"{key}.{sub}", sub_value)


def apply_override(cfg: TrainConfig, override: str) -> TrainConfig:
    """Apply one ``a.b=value`` override (value parsed as a YAML scalar, then type-checked).

    The override becomes the origin of ``a.b`` (and of the keys inside a mapping value)."""
    key, sep, text = override.partition("=")
    where = f"override {override!r}"
    if not sep or not key:
        raise ConfigError(f"{where}: expected KEY=VALUE with a dotted key, e.g. optimizer.lr=1e-4")
    key = key.strip()
    parts = key.split(".")
    value = _parse_scalar(text)
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    if parts[0] == "model" and len(parts) > 2:  # model.moe.top_k: merge into the nested mapping
        nested = {"model": _deep_merge(cfg.model, nested["model"])}
    return _apply(cfg, nested, dict.fromkeys(_dotted_keys(key, value), where), where)


def _parse(text: str, source: str) -> TrainConfig:
    """The defaults with the YAML ``text`` (read from ``source``) applied; type-checked only."""
    try:
        data = yaml.safe_load(text)
        lines = _yaml_lines(yaml.compose(text)) if data else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    cfg = TrainConfig(source=source)
    if data is None:
        return cfg
    return _apply(cfg, data, {key: f"{source}:{line}" for key, line in lines.items()}, source)


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), check_reference: bool = True
) -> TrainConfig:
    """Read ``path`` (YAML; None = defaults only), apply ``overrides``, check the result.

    ``check_reference=False`` skips the ``reference`` section's checks (``prefpack
    ref-logprobs`` writes the file that section names). Raises :class:`ConfigError`."""
    cfg = _read(path, overrides)
    check_config(cfg, check_reference)
    return cfg


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of ``path`` with ``overrides``, values checked and the model resolved, as
    written for some other machine: no file it names need exist and GPU-only settings are
    kept (``prefpack plan`` plans a cluster's run from here). Raises :class:`ConfigError`."""
    cfg = _read(path, overrides)
    _check_values(cfg)
    model_config(cfg)
    return cfg


def _read(path: str | Path | None, overrides: Sequence[str]) -> TrainConfig:
    cfg = TrainConfig()
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from err
        cfg = _parse(text, str(path))
    for override in overrides:
        cfg = apply_override(cfg, override)
    return cfg


def config_from_yaml(text: str, source: str) -> TrainConfig:
    """The config :func:`to_yaml` wrote (e.g. the one a checkpoint stores), read back from
    ``text``; ``source`` names it in errors. Values and the model are checked as by
    :func:`load_config`, but no file it names need exist (paths may have moved since).
    Raises :class:`ConfigError`."""
    cfg = _parse(text, source)
    _check_values(cfg)
    model_config(cfg)
    return cfg


# ----------------------------------------------------------------------------- checks


def config_error(cfg: TrainConfig, key: str, message: str, related: Iterable[str] = ()) -> ConfigError:
    """A :class:`ConfigError` ``<origin>: <key>: <message>``. The origin is where the value was
    set (``file:line`` or the override), of ``key`` and the ``related`` keys the one set last
    (an override beats the file); the config file when none was set explicitly."""
    return ConfigError(f"{_origin(cfg.origins, [key, *related], cfg.source)}: {key}: {message}")


def _at_least(bound: int) -> tuple[str, Callable[[Any], bool]]:
    return f">= {bound}", lambda value: value >= bound


def _in_unit_interval() -> tuple[str, Callable[[Any], bool]]:
    return "in [0, 1)", lambda value: 0 <= value < 1


_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "run.train_steps": _at_least(1),
    "run.log_interval": _at_least(1),
    "run.seed": _at_least(0),
    "run.eval_interval": _at_least(0),
    "run.eval_batches": _at_least(0),
    "run.max_nonfinite_steps": _at_least(1),
    "run.timeout_minutes": ("> 0", lambda value: value > 0),
    "data.eval_fraction": _in_unit_interval(),
    "data.seq_len": _at_least(1),
    "data.micro_batch_size": _at_least(1),
    "data.global_batch_size": _at_least(1),
    "parallel.tensor": _at_least(1),
    "parallel.pipeline": _at_least(1),
    "parallel.virtual_pipeline": _at_least(1),
    "parallel.context": _at_least(1),
    "parallel.expert": _at_least(1),
    "optimizer.lr": ("> 0", lambda value: value > 0),
    "optimizer.min_lr": _at_least(0),
    "optimizer.warmup_steps": _at_least(0),
    "optimizer.decay_steps": _at_least(1),
    "optimizer.weight_decay": _at_least(0),
    "optimizer.clip_grad": (">= 0 (0: no clipping)", lambda value: value >= 0),
    "optimizer.adam_beta1": _in_unit_interval(),
    "optimizer.adam_beta2": _in_unit_interval(),
    "optimizer.adam_eps": ("> 0", lambda value: value > 0),
    "optimizer.optimizer_offload_fraction": ("in [0, 1]", lambda value: 0 <= value <= 1),
    "performance.recompute_num_layers": _at_least(1),
    "ddp.bucket_size": _at_least(1),
    "objective.rm.center_coefficient": _at_least(0),
    "objective.rm.head_init_std": ("> 0", lambda value: value > 0),
    "checkpoint.interval": _at_least(0),
    "checkpoint.keep": _at_least(0),
    "checkpoint.keep_best": _at_least(0),
}
"""Dotted key -> (the allowed range in words, its test); None values (unset) are not checked.
``objective.dpo`` ranges are :class:`DPOConfig`'s own; the model's are ``ModelConfig``'s."""


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every setting in dataclass ``obj``, nested dataclasses walked;
    fields with ``compare=False`` (bookkeeping such as ``source``) are not settings."""
    for f in dataclasses.fields(obj):
        if not f.compare:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _range_error(key: str, value: Any) -> str | None:
    """Why ``value`` is not allowed for ``key`` (None: it is); only numbers are checked here."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    bound, holds = _RANGES.get(key, ("", lambda _: True))
    is_float = isinstance(value, float)
    if (not is_float or math.isfinite(value)) and holds(value):
        return None
    wanted = " ".join(filter(None, ("a finite number" if is_float else "", bound)))
    return f"must be {wanted}, got {value}"


def _check_values(cfg: TrainConfig) -> None:
    """Every number finite and in range, the keys that must agree agreeing (no files read)."""
    for key, value in _leaves(cfg):
        error = _range_error(key, value)
        if error:
            raise config_error(cfg, key, error)
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        raise config_error(
            cfg,
            "optimizer.min_lr",
            f"{cfg.optimizer.min_lr} is above optimizer.lr {cfg.optimizer.lr}",
            related=["optimizer.lr"],
        )
    if cfg.data.global_batch_size % cfg.data.micro_batch_size:
        raise config_error(
            cfg,
            "data.global_batch_size",
            f"{cfg.data.global_batch_size} is not a multiple of data.micro_batch_size "
            f"{cfg.data.micro_batch_size}",
            related=["data.micro_batch_size"],
        )
    _check_performance(cfg)
    _check_logging(cfg)
    _check_best_checkpoints(cfg)
    _check_objective(cfg)


def _check_objective(cfg: TrainConfig) -> None:
    """``objective.sft.response_weights``: finite numbers >= 0, with every response trained."""
    sft = cfg.objective.sft
    weights = sft.response_weights
    if weights is None:
        return
    if not weights or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in weights
    ):
        raise config_error(
            cfg,
            "objective.sft.response_weights",
            f"must be a non-empty list of finite numbers >= 0, got {weights!r}",
        )
    if sft.responses == "first":
        raise config_error(
            cfg,
            "objective.sft.response_weights",
            "weights each response of a group, but objective.sft.responses 'first' trains response 0 "
            "only: set responses: all or remove the weights",
            related=["objective.sft.responses"],
        )


def _check_logging(cfg: TrainConfig) -> None:
    """The W&B keys need ``run.wandb_project`` (W&B is off without it), which must name one."""
    run = cfg.run
    if run.wandb_project is None:
        for key in ("wandb_entity", "wandb_name", "wandb_mode", "wandb_dir"):
            if getattr(run, key) is not None:
                raise config_error(
                    cfg,
                    f"run.{key}",
                    "applies to Weights & Biases logging, which is off: set run.wandb_project too",
                    related=["run.wandb_project"],
                )
    elif not run.wandb_project.strip():
        raise config_error(cfg, "run.wandb_project", "must name a W&B project (null: no W&B)")


def _check_best_checkpoints(cfg: TrainConfig) -> None:
    """``checkpoint.keep_best`` needs evaluations, and a direction for a metric other than the loss."""
    ckpt = cfg.checkpoint
    if not ckpt.keep_best:
        return
    if cfg.data.eval_fraction == 0:
        raise config_error(
            cfg,
            "checkpoint.keep_best",
            "ranks checkpoints by a held-out metric: set data.eval_fraction > 0",
            related=["data.eval_fraction"],
        )
    if ckpt.best_mode is None and ckpt.best_metric != "loss":
        raise config_error(
            cfg,
            "checkpoint.best_mode",
            f"say whether a lower ('min') or higher ('max') {ckpt.best_metric!r} is better",
            related=["checkpoint.best_metric"],
        )


def _check_performance(cfg: TrainConfig) -> None:
    """The speed and memory settings agree with each other and with the layout (Megatron's own
    rules, checked here so they name the key before any work)."""
    perf, ddp, opt, par = cfg.performance, cfg.ddp, cfg.optimizer, cfg.parallel
    if perf.recompute_granularity == "full":
        for key in ("recompute_method", "recompute_num_layers"):
            if getattr(perf, key) is None:
                raise config_error(
                    cfg,
                    f"performance.{key}",
                    "required with recompute_granularity: full",
                    related=["performance.recompute_granularity"],
                )
    else:
        for key in ("recompute_method", "recompute_num_layers"):
            if getattr(perf, key) is not None:
                raise config_error(
                    cfg,
                    f"performance.{key}",
                    "applies to recompute_granularity: full only",
                    related=["performance.recompute_granularity"],
                )
    if perf.recompute_modules is not None:
        if perf.recompute_granularity != "selective":
            raise config_error(
                cfg,
                "performance.recompute_modules",
                "applies to recompute_granularity: selective only",
                related=["performance.recompute_granularity"],
            )
        unknown = [m for m in perf.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown or not perf.recompute_modules:
            raise config_error(
                cfg,
                "performance.recompute_modules",
                f"{unknown[0] if unknown else 'an empty list'!r} is not a module Megatron recomputes; "
                f"choose from {', '.join(RECOMPUTE_MODULES)}",
            )
        if "moe_act" in perf.recompute_modules and not perf.moe_grouped_gemm:
            raise config_error(
                cfg,
                "performance.recompute_modules",
                "'moe_act' needs performance.moe_grouped_gemm: true",
                related=["performance.moe_grouped_gemm"],
            )
        if "shared_experts" in perf.recompute_modules and perf.moe_shared_expert_overlap:
            raise config_error(
                cfg,
                "performance.recompute_modules",
                "'shared_experts' cannot be recomputed with performance.moe_shared_expert_overlap",
                related=["performance.moe_shared_expert_overlap"],
            )
    if perf.moe_token_dispatcher_type == "flex" and par.tensor * par.expert == 1:
        raise config_error(
            cfg,
            "performance.moe_token_dispatcher_type",
            "'flex' needs parallel.tensor * parallel.expert > 1 (Megatron's rule)",
            related=["parallel.tensor", "parallel.expert"],
        )
    if perf.moe_shared_expert_overlap and perf.moe_token_dispatcher_type != "alltoall":
        raise config_error(
            cfg,
            "performance.moe_shared_expert_overlap",
            "needs moe_token_dispatcher_type: alltoall",
            related=["performance.moe_token_dispatcher_type"],
        )
    if perf.tp_comm_overlap and not (par.tensor > 1 and par.sequence_parallel):
        raise config_error(
            cfg,
            "performance.tp_comm_overlap",
            "needs parallel.tensor > 1 with sequence_parallel: true",
            related=["parallel.tensor", "parallel.sequence_parallel"],
        )
    if ddp.overlap_param_gather and not (par.distributed_optimizer and ddp.overlap_grad_reduce):
        raise config_error(
            cfg,
            "ddp.overlap_param_gather",
            "needs parallel.distributed_optimizer: true and ddp.overlap_grad_reduce: true",
            related=["parallel.distributed_optimizer", "ddp.overlap_grad_reduce"],
        )
    for key in ("use_precision_aware_optimizer", "optimizer_cpu_offload"):
        if getattr(opt, key) and not par.distributed_optimizer:
            raise config_error(
                cfg,
                f"optimizer.{key}",
                "needs parallel.distributed_optimizer: true",
                related=["parallel.distributed_optimizer"],
            )
    if opt.optimizer_cpu_offload and not opt.use_precision_aware_optimizer:
        raise config_error(
            cfg,
            "optimizer.optimizer_cpu_offload",
            "needs optimizer.use_precision_aware_optimizer: true (Megatron's rule)",
            related=["optimizer.use_precision_aware_optimizer"],
        )
    for key in ("exp_avg_dtype", "exp_avg_sq_dtype"):
        if getattr(opt, key) != "float32" and not opt.use_precision_aware_optimizer:
            raise config_error(
                cfg,
                f"optimizer.{key}",
                "needs optimizer.use_precision_aware_optimizer: true",
                related=["optimizer.use_precision_aware_optimizer"],
            )
    if par.pipeline_layout is not None:
        for key in ("first_stage_layers", "last_stage_layers"):
            if getattr(par, key) is not None:
                raise config_error(
                    cfg,
                    f"parallel.{key}",
                    "give parallel.pipeline_layout or first/last_stage_layers, not both",
                    related=["parallel.pipeline_layout"],
                )
        if par.pipeline < 2:
            raise config_error(
                cfg, "parallel.pipeline_layout", "needs parallel.pipeline >= 2", related=["parallel.pipeline"]
            )


_NEEDS: dict[str, tuple[Callable[[TrainConfig], bool], tuple[str, ...]]] = {
    "performance.moe_grouped_gemm": (
        lambda c: c.performance.moe_grouped_gemm,
        ("cuda", "transformer_engine"),
    ),
    "performance.moe_permute_fusion": (
        lambda c: c.performance.moe_permute_fusion,
        ("cuda", "transformer_engine"),
    ),
    "performance.moe_token_dispatcher_type": (
        lambda c: c.performance.moe_token_dispatcher_type == "flex",
        ("cuda", "deep_ep"),
    ),
    "performance.moe_shared_expert_overlap": (lambda c: c.performance.moe_shared_expert_overlap, ("cuda",)),
    "performance.fp8": (lambda c: c.performance.fp8 is not None, ("cuda", "transformer_engine")),
    "performance.tp_comm_overlap": (lambda c: c.performance.tp_comm_overlap, ("cuda", "transformer_engine")),
    "performance.gradient_accumulation_fusion": (
        lambda c: c.performance.gradient_accumulation_fusion,
        ("cuda", "fused_weight_gradient_mlp_cuda"),
    ),
    "optimizer.use_precision_aware_optimizer": (
        lambda c: c.optimizer.use_precision_aware_optimizer,
        ("cuda", "transformer_engine"),
    ),
    "optimizer.optimizer_cpu_offload": (lambda c: c.optimizer.optimizer_cpu_offload, ("cuda",)),
}
"""Setting -> (whether the config turns it on, what it needs on this machine)."""


def _check_runtime_support(cfg: TrainConfig, model: Any) -> None:
    """Settings this machine or model cannot run are refused, naming the key and the reason."""
    from megatron_prefpack.platform import features

    for key, (enabled, needs) in _NEEDS.items():
        reason = features.missing_for(needs) if enabled(cfg) else None
        if reason:
            raise config_error(cfg, key, reason)
    if cfg.run.wandb_project is not None and not features.installed("wandb"):
        raise config_error(
            cfg,
            "run.wandb_project",
            "Weights & Biases logging needs wandb (pip install wandb), not installed here",
        )
    perf = cfg.performance
    defaults = PerformanceConfig()
    moe_keys = [
        key
        for key in (
            "moe_grouped_gemm",
            "moe_permute_fusion",
            "moe_token_dispatcher_type",
            "moe_shared_expert_overlap",
        )
        if getattr(perf, key) != getattr(defaults, key)
    ]
    if moe_keys and model.moe is None:
        raise config_error(
            cfg, f"performance.{moe_keys[0]}", "applies to MoE models; this model has no experts"
        )
    modules = set(perf.recompute_modules or ())
    needs_moe = sorted(modules & {"moe", "moe_act", "shared_experts"})
    if needs_moe and model.moe is None:
        raise config_error(cfg, "performance.recompute_modules", f"{needs_moe[0]!r} needs an MoE model")
    if "shared_experts" in modules and not model.moe.shared_expert_ffn_hidden_size:
        raise config_error(
            cfg, "performance.recompute_modules", "'shared_experts': the model has no shared expert"
        )
    if perf.moe_shared_expert_overlap and not model.moe.shared_expert_ffn_hidden_size:
        raise config_error(cfg, "performance.moe_shared_expert_overlap", "the model has no shared expert")
    if "mlp" in modules and model.moe is not None and not model.moe_layer_pattern().count(0):
        raise config_error(cfg, "performance.recompute_modules", "'mlp': the model has no dense MLP layer")
    if "layernorm" in modules and features.has_cuda() and not features.installed("transformer_engine"):
        # Megatron's output-discarding checkpoint asks Transformer Engine about FP8 on a GPU.
        raise config_error(
            cfg, "performance.recompute_modules", "'layernorm' on a GPU needs Transformer Engine"
        )
    if model.lora is not None:
        # LoRA builds Megatron's local layer spec: the Transformer Engine layers are not there.
        te_layers = {
            "performance.fp8": perf.fp8 is not None,
            "performance.tp_comm_overlap": perf.tp_comm_overlap,
        }
        te_layers["performance.moe_grouped_gemm"] = perf.moe_grouped_gemm
        for key, enabled in te_layers.items():
            if enabled:
                raise config_error(
                    cfg, key, "needs Transformer Engine's layers, which LoRA does not adapt", ["model.lora"]
                )
    if "mla_up_proj" in modules and model.mla is None:
        raise config_error(
            cfg, "performance.recompute_modules", "'mla_up_proj' needs an MLA model (model.mla)"
        )


def _check_files(cfg: TrainConfig) -> None:
    """The dataset directory and the checkpoint to load exist."""
    if not cfg.data.path:
        raise config_error(cfg, "data.path", "required: the preprocessed dataset directory")
    if not Path(cfg.data.path).is_dir():
        raise config_error(cfg, "data.path", f"no such dataset directory: {cfg.data.path}")
    if cfg.checkpoint.load is not None and not Path(cfg.checkpoint.load).exists():
        raise config_error(cfg, "checkpoint.load", f"no such checkpoint: {cfg.checkpoint.load}")


def check_config(cfg: TrainConfig, check_reference: bool = True) -> None:
    """Checks that need no world size: values in range, files present, model resolvable,
    the performance settings runnable on this machine and model."""
    _check_values(cfg)
    _check_files(cfg)
    if check_reference:
        _check_reference(cfg)
    _check_runtime_support(cfg, model_config(cfg))


def _check_reference(cfg: TrainConfig) -> None:
    ref = cfg.reference
    needs_reference = cfg.objective.type == "dpo" and cfg.objective.dpo.needs_reference
    if needs_reference and ref.mode == "none":
        raise config_error(
            cfg, "reference.mode", "DPO needs reference log-probs: 'offline', 'online' or (LoRA) 'base'"
        )
    if ref.mode == "base":
        if model_config(cfg).lora is None:
            raise config_error(
                cfg,
                "reference.mode",
                "'base' is the policy with its LoRA adapters switched off: it needs model.lora "
                "(e.g. model.lora.rank=16)",
                related=["model.lora"],
            )
        for key in ("path", "load"):
            if getattr(ref, key) is not None:
                raise config_error(
                    cfg,
                    f"reference.{key}",
                    "reference.mode 'base' is the policy's own base weights; remove this key",
                    related=["reference.mode"],
                )
    if ref.mode == "offline":
        if ref.path is None:
            raise config_error(cfg, "reference.path", "offline reference needs the ref-logprobs file")
        if not Path(ref.path).exists():
            raise config_error(cfg, "reference.path", f"no such file: {ref.path}")
    if ref.load is not None and not Path(ref.load).exists():
        raise config_error(cfg, "reference.load", f"no such checkpoint: {ref.load}")


def _hf_model_base(cfg: TrainConfig, source: Any) -> dict[str, Any]:
    """The ``ModelConfig`` fields of a Hugging Face ``config.json`` (``model.hf_config``: the
    file or its directory), translated exactly or refused naming the field."""
    from megatron_prefpack.models.hf import ConversionError, read_model_config

    path = Path(str(source))
    try:
        _, hf_model = read_model_config(path.parent if path.name == "config.json" else path)
    except ConversionError as err:
        raise config_error(cfg, "model.hf_config", str(err)) from None
    return dataclasses.asdict(hf_model)


def model_config(cfg: TrainConfig) -> Any:
    """Resolve ``cfg.model`` into a ``ModelConfig``: a ``preset``, or ``hf_config`` (a Hugging
    Face ``config.json`` or its directory, e.g. the one a checkpoint was converted from), and/or
    ``ModelConfig`` fields, which override the preset's or the HF config's (nested sections merge
    key by key)."""
    from megatron_prefpack.models import presets
    from megatron_prefpack.models.config import ModelConfig

    section = dict(cfg.model)
    preset = section.pop("preset", None)
    hf_config = section.pop("hf_config", None)
    base: dict[str, Any] = {}
    if preset is not None and hf_config is not None:
        raise config_error(cfg, "model.hf_config", "give model.preset or model.hf_config, not both")
    if hf_config is not None:
        base = _hf_model_base(cfg, hf_config)
    if preset is not None:
        if preset not in presets.PRESETS:
            close = difflib.get_close_matches(str(preset), list(presets.PRESETS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise config_error(
                cfg, "model.preset", f"unknown preset {preset!r}{hint}; known: {', '.join(presets.PRESETS)}"
            )
        base = dataclasses.asdict(presets.preset(preset))
    checked = _checked(ModelConfig, section, "model.", cfg.origins, cfg.source)
    try:
        return ModelConfig.from_dict(_deep_merge(base, checked), where="model")
    except ModelConfigError as err:
        # A field the preset set can be wrong because of another one the config set.
        explicit = err.key in cfg.origins
        related = () if explicit else [key for key in cfg.origins if key.startswith("model.")]
        raise config_error(cfg, err.key, err.reason, related) from None


def check_parallel_layout(cfg: TrainConfig, world_size: int, model: Any) -> int:
    """Check the parallel layout against ``world_size`` and the resolved ``model`` config.

    Returns the data-parallel size. Raises :class:`ConfigError` naming the key."""
    par = cfg.parallel
    model_parallel = par.tensor * par.pipeline * par.context
    if world_size % model_parallel:
        raise config_error(
            cfg,
            "parallel",
            f"tensor*pipeline*context = {par.tensor}*{par.pipeline}*{par.context} = {model_parallel} "
            f"does not divide the world size {world_size}",
            related=["parallel.tensor", "parallel.pipeline", "parallel.context"],
        )
    dp = world_size // model_parallel
    # Expert tensor parallelism equals TP, so experts are spread over the data x context ranks.
    if (dp * par.context) % par.expert:
        raise config_error(
            cfg,
            "parallel.expert",
            f"{par.expert} does not divide data*context = {dp * par.context} ranks (world {world_size})",
            related=["parallel.tensor", "parallel.pipeline", "parallel.context"],
        )
    heads = model.num_attention_heads
    if heads % par.tensor:
        raise config_error(
            cfg,
            "parallel.tensor",
            f"{par.tensor} does not divide the {heads} attention heads",
            related=["model.num_attention_heads"],
        )
    groups = getattr(model, "num_query_groups", None)
    if groups and groups % par.tensor:
        raise config_error(
            cfg,
            "parallel.tensor",
            f"{par.tensor} does not divide the {groups} query groups",
            related=["model.num_query_groups"],
        )
    experts = model.moe.num_experts if model.moe is not None else None
    if par.expert > 1 and not experts:
        raise config_error(cfg, "parallel.expert", f"expert parallel {par.expert} needs an MoE model")
    if experts and experts % par.expert:
        raise config_error(
            cfg,
            "parallel.expert",
            f"{par.expert} does not divide the {experts} experts",
            related=["model.moe.num_experts"],
        )
    _check_pipeline_split(cfg, model.num_layers)
    _check_recompute_split(cfg, model)
    if par.virtual_pipeline is not None and par.pipeline < 2:
        raise config_error(
            cfg, "parallel.virtual_pipeline", "needs parallel.pipeline >= 2", related=["parallel.pipeline"]
        )
    if experts and par.tensor > 1 and not par.sequence_parallel:
        raise config_error(
            cfg,
            "parallel.sequence_parallel",
            "MoE with tensor parallel needs sequence_parallel: true",
            related=["parallel.tensor"],
        )
    if getattr(model, "mla", None) is not None and par.tensor > 1 and not par.sequence_parallel:
        raise config_error(
            cfg,
            "parallel.sequence_parallel",
            "MLA with tensor parallel needs sequence_parallel: true (without it Megatron's "
            "TP-split KV down-projection gets part of its gradient wrong)",
            related=["parallel.tensor"],
        )
    if par.sequence_parallel and par.tensor == 1:
        raise config_error(
            cfg, "parallel.sequence_parallel", "needs parallel.tensor > 1", related=["parallel.tensor"]
        )
    shards = (par.tensor if par.sequence_parallel else 1) * (2 * par.context if par.context > 1 else 1)
    if cfg.data.seq_len % shards:
        raise config_error(
            cfg,
            "data.seq_len",
            f"{cfg.data.seq_len} is not divisible by {shards} (sequence/context shards)",
            related=["parallel.tensor", "parallel.sequence_parallel", "parallel.context"],
        )
    if cfg.data.global_batch_size % (cfg.data.micro_batch_size * dp):
        raise config_error(
            cfg,
            "data.global_batch_size",
            f"{cfg.data.global_batch_size} is not a multiple of micro_batch_size*data_parallel = "
            f"{cfg.data.micro_batch_size}*{dp}",
            related=["data.micro_batch_size"],
        )
    microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
    if par.virtual_pipeline is not None and microbatches % par.pipeline:
        raise config_error(
            cfg,
            "data.global_batch_size",
            f"{cfg.data.global_batch_size} rows = {microbatches} micro-batches per data-parallel rank, "
            f"not a multiple of parallel.pipeline {par.pipeline}: Megatron's interleaved schedule "
            "needs that with a virtual pipeline",
            related=["data.micro_batch_size", "parallel.virtual_pipeline", "parallel.pipeline"],
        )
    return dp


def _check_pipeline_split(cfg: TrainConfig, num_layers: int) -> None:
    """The layers split over the pipeline stages: evenly, with ``first_stage_layers`` /
    ``last_stage_layers`` set and the rest shared evenly by the middle stages, or as
    ``pipeline_layout`` says."""
    par = cfg.parallel
    if par.pipeline_layout is not None:
        _check_pipeline_layout(cfg, num_layers)
        return
    edges = {"first_stage_layers": par.first_stage_layers, "last_stage_layers": par.last_stage_layers}
    given = {key: value for key, value in edges.items() if value is not None}
    if not given:
        stages = par.pipeline * (par.virtual_pipeline or 1)
        if num_layers % stages:
            raise config_error(
                cfg,
                "parallel.pipeline",
                f"pipeline*virtual_pipeline = {stages} does not divide the {num_layers} layers; "
                "set parallel.first_stage_layers / last_stage_layers for an uneven split",
                related=["parallel.virtual_pipeline", "model.num_layers"],
            )
        return
    for key, value in given.items():
        if par.pipeline < 2:
            raise config_error(
                cfg, f"parallel.{key}", "needs parallel.pipeline >= 2", related=["parallel.pipeline"]
            )
        if value < 1:
            raise config_error(cfg, f"parallel.{key}", f"must be >= 1, got {value}")
    if par.virtual_pipeline is not None:
        raise config_error(
            cfg,
            "parallel.virtual_pipeline",
            "is not supported with first/last_stage_layers (untested here)",
            related=[f"parallel.{key}" for key in given],
        )
    middle_stages = par.pipeline - len(given)
    middle_layers = num_layers - sum(given.values())
    if (
        middle_layers < 0
        or (middle_stages == 0 and middle_layers)
        or (middle_stages and (middle_layers == 0 or middle_layers % middle_stages))
    ):
        raise config_error(
            cfg,
            "parallel.pipeline",
            f"{middle_layers} of the {num_layers} layers are left for {middle_stages} other "
            f"stage(s) after {given}: they must split evenly, at least one each",
            related=[f"parallel.{key}" for key in given] + ["model.num_layers"],
        )


def chunk_layer_counts(cfg: TrainConfig, num_layers: int) -> list[int]:
    """Transformer layers in each model chunk (pipeline stage, or virtual stage of one),
    for a split that :func:`_check_pipeline_split` accepted."""
    par = cfg.parallel
    if par.pipeline_layout is not None:
        from megatron.core.transformer.enums import LayerType
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        layout = PipelineParallelLayerLayout(par.pipeline_layout, par.pipeline).layout
        return [chunk.count(LayerType.decoder) for stage in layout for chunk in stage]
    if par.first_stage_layers is None and par.last_stage_layers is None:
        chunks = par.pipeline * (par.virtual_pipeline or 1)
        return [num_layers // chunks] * chunks
    edges = [n for n in (par.first_stage_layers, par.last_stage_layers) if n is not None]
    middle = (num_layers - sum(edges)) // max(par.pipeline - len(edges), 1)
    counts = [middle] * (par.pipeline - len(edges))
    if par.first_stage_layers is not None:
        counts.insert(0, par.first_stage_layers)
    if par.last_stage_layers is not None:
        counts.append(par.last_stage_layers)
    return counts


def _check_recompute_split(cfg: TrainConfig, model: Any) -> None:
    """megatron-core before 0.17 mis-handles two full-recompute cases (fixed in 0.19): a
    ``uniform`` chunk size that does not divide a stage's layers fails at the first step, and
    a ``block`` window shorter than a stage of an MoE model runs the layers after it without
    the pad mask (pads then enter routing statistics silently). Both are refused there."""
    from megatron.core.package_info import __version__ as megatron_version

    perf = cfg.performance
    if perf.recompute_granularity != "full" or tuple(map(int, megatron_version.split(".")[:2])) >= (0, 17):
        return
    counts = chunk_layer_counts(cfg, model.num_layers)
    n = perf.recompute_num_layers
    if perf.recompute_method == "uniform" and any(c % n for c in counts if c):
        raise config_error(
            cfg,
            "performance.recompute_num_layers",
            f"{n} does not divide the layers of every pipeline stage ({counts}); megatron-core "
            f"{megatron_version} needs that for recompute_method: uniform (0.19 does not)",
            related=["performance.recompute_method"],
        )
    if perf.recompute_method == "block" and model.moe is not None and any(n < c for c in counts):
        raise config_error(
            cfg,
            "performance.recompute_num_layers",
            f"{n} is less than a stage's layers ({counts}): megatron-core {megatron_version} would "
            "run the MoE layers after the block without the pad mask; recompute whole stages, use "
            "recompute_method: uniform, or megatron-core >= 0.19",
            related=["performance.recompute_method"],
        )


def _check_pipeline_layout(cfg: TrainConfig, num_layers: int) -> None:
    """``parallel.pipeline_layout`` parses with Megatron's own parser, places every layer once
    (embedding first, loss last) and its number of virtual stages is ``parallel.virtual_pipeline``."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    par = cfg.parallel
    try:
        layout = PipelineParallelLayerLayout(par.pipeline_layout, par.pipeline)
        layout.validate_layer_layout(num_layers, None)
    except (AssertionError, ValueError, KeyError) as err:
        raise config_error(
            cfg,
            "parallel.pipeline_layout",
            f"{par.pipeline_layout!r} is not a layout of {num_layers} layers over {par.pipeline} "
            f"stages: {err}",
            related=["parallel.pipeline", "model.num_layers"],
        ) from None
    virtual = layout.virtual_pipeline_model_parallel_size
    if (par.virtual_pipeline or 1) != virtual:
        raise config_error(
            cfg,
            "parallel.virtual_pipeline",
            f"{par.virtual_pipeline} but parallel.pipeline_layout has {virtual} virtual stage(s) per "
            f"rank ({len(layout.flatten_layout)} entries over {par.pipeline} stages); set "
            f"parallel.virtual_pipeline: {virtual if virtual > 1 else 'null'}",
            related=["parallel.pipeline_layout"],
        )


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written into the run dir and checkpoints)."""
    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_KEYS}
    plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in data.items()}
    return yaml.safe_dump(plain, sort_keys=False)


# ----------------------------------------------------------------------------- resume


class Change(NamedTuple):
    """One setting that differs between a checkpoint's config and the current one."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


@dataclass
class ResumeChanges:
    """What differs on resume: ``refused`` changes stop the run, ``applied`` ones are taken into
    the resumed optimizer and schedule, ``noted`` ones take effect as they are and are announced."""

    refused: list[Change] = field(default_factory=list)
    applied: list[Change] = field(default_factory=list)
    noted: list[Change] = field(default_factory=list)


_REFUSED_ON_RESUME = (
    "data",
    "model",
    "parallel",
    "objective",
    "reference.mode",
    "run.seed",
    # The layout of the saved optimizer state.
    "optimizer.use_precision_aware_optimizer",
    "optimizer.exp_avg_dtype",
    "optimizer.exp_avg_sq_dtype",
    "optimizer.optimizer_cpu_offload",
    "optimizer.optimizer_offload_fraction",
)
_APPLIED_ON_RESUME = ("optimizer",)
_NOTED_ON_RESUME = ("performance", "ddp")


def _under(key: str, roots: Iterable[str]) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    """Dotted key -> value of every setting, ``model`` resolved into its ``ModelConfig`` fields
    (so a preset and the same fields written out are equal)."""
    flat = dict(_leaves(cfg))
    del flat["model"]
    return flat | dict(_leaves(model_config(cfg), "model."))


def resume_changes(saved: TrainConfig, current: TrainConfig) -> ResumeChanges:
    """Compare the config a checkpoint was written with (``saved``) to the ``current`` one.

    Policy:

    * refused (resuming would silently train on other inputs or mis-read the saved state):
      any change in ``data.*`` (``data.path`` compared as written), the model (its resolved
      ``ModelConfig``, not the way the config spells it), ``parallel.*``, ``objective.*``,
      ``reference.mode`` and ``run.seed``;
      and the optimizer state's layout (``optimizer.use_precision_aware_optimizer``, the moment
      dtypes, CPU offload);
    * applied (the trainer takes them into the resumed schedule and announces them): the other
      ``optimizer.*`` settings;
    * noted (they change speed and memory, not what is trained; announced): ``performance.*``
      and ``ddp.*`` (with the distributed optimizer, whose state is saved per gradient bucket,
      ``ddp.bucket_size`` and ``ddp.overlap_grad_reduce`` are refused);
    * free, not reported: everything else (``run.train_steps``, intervals, ``run.dir``,
      ``run.tensorboard``, ``run.timeout_minutes``, ``run.max_nonfinite_steps``,
      ``checkpoint.*``, ``reference.path`` / ``reference.load``).

    A setting only one side has is compared with None. Raises :class:`ConfigError` when either
    model does not resolve."""
    old, new = _settings(saved), _settings(current)
    changes = [Change(key, old.get(key), new.get(key)) for key in old | new if old.get(key) != new.get(key)]
    refused_roots = _REFUSED_ON_RESUME
    if current.parallel.distributed_optimizer:
        # Its state is saved per gradient bucket: another bucket layout cannot load it.
        refused_roots = (*refused_roots, "ddp.bucket_size", "ddp.overlap_grad_reduce")
    refused = [change for change in changes if _under(change.key, refused_roots)]
    return ResumeChanges(
        refused=refused,
        applied=[c for c in changes if _under(c.key, _APPLIED_ON_RESUME) and c not in refused],
        noted=[c for c in changes if _under(c.key, _NOTED_ON_RESUME) and c not in refused],
    )
