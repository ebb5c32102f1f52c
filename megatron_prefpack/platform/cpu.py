"""Let Megatron-Core (0.16.1 and 0.19.2) train on CPU over gloo: tests, CI and the CPU demo.

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the math. With
no GPU, ``enable_cpu_megatron()`` replaces exactly those places with CPU equivalents, one
monkeypatch per problem, each documented below with what breaks and why the replacement
computes the same thing. Megatron's files are not copied or edited; a function Megatron imported
by name into other modules is replaced in all of them (``_rebind``).

Contract:
- call ``enable_cpu_megatron()`` once per process before building models (``platform.distributed
  .initialize`` does it on CPU); calling it again is a no-op; patches last for the process;
- it raises ``RuntimeError`` when CUDA is available: a GPU job must never run patched code;
- ``check_cpu_config(config)`` names the model settings this platform cannot run (MoE needs
  ``add_bias_linear=False``; pipeline parallelism over gloo needs ``batch_p2p_comm=False``; no
  CUDA-only kernels). ``use_cpu_initialization=True`` is recommended: every TP shard is then a
  slice of one master weight drawn from the CPU generator.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

_ENABLED = False

# Imported before patching so every module that imports a patched function by name exists.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.pipeline_parallel",
    "megatron.core.transformer.moe.moe_layer",
)


def _rebind(module: types.ModuleType, name: str, new: Any) -> None:
    """Replace ``module.name`` and every ``megatron.core`` module global bound to the same object."""
    old = getattr(module, name)
    for loaded in list(sys.modules.values()):
        if getattr(loaded, "__name__", "").startswith("megatron.core") and loaded.__dict__.get(name) is old:
            setattr(loaded, name, new)
    setattr(module, name, new)


def _cpu_rng_tracker_class() -> type:
    """Megatron's RNG tracker with CPU generator states instead of CUDA ones.

    Breaks: ``CudaRNGStatesTracker.add``/``fork`` read and write ``torch.cuda`` RNG states, which
    raise without a GPU. Megatron forks the tracker for weight init and dropout inside
    tensor-parallel regions. Safe: the subclass keeps the tracker's contract (named states, each
    seeded once, ``fork`` swaps a state in and restores the caller's on exit) on the CPU default
    generator, which is the generator CPU kernels draw from.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    base = mcore_random.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """Named CPU RNG states; see ``megatron.core.tensor_parallel.random.CudaRNGStatesTracker``."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            caller_state = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(caller_state)

        @contextlib.contextmanager
        def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            caller_state = torch.get_rng_state()
            caller_name = self._current_state_name
            if caller_name != "default-rng":
                self.states_[caller_name] = caller_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if caller_name != "default-rng":
                    caller_state = self.states_[caller_name]
                torch.set_rng_state(caller_state)
                self._current_state_name = caller_name

    CpuRNGStatesTracker.__name__ = CpuRNGStatesTracker.__qualname__ = "CpuRNGStatesTracker"
    return CpuRNGStatesTracker


def _patch_rng_tracker() -> None:
    """Megatron builds its RNG tracker from ``CpuRNGStatesTracker`` (see ``_cpu_rng_tracker_class``)."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    # A tracker created before the patch holds CUDA states; the next seed call rebuilds it.
    mcore_random.initialize_rng_tracker(force_reset=True)


def _patch_recompute_rng() -> None:
    """Megatron's activation recompute saves and restores the CPU generator as "the CUDA RNG state".

    Breaks: ``tensor_parallel.checkpoint`` (full and selective recompute) and
    ``CheckpointWithoutOutput`` (``mla_up_proj``, ``layernorm``, ``moe_act`` recompute) save all
    RNG states before the first forward and restore them for the re-run, so dropout draws the
    same masks; the "CUDA" part goes through ``random._get_cuda_rng_state`` /
    ``_set_cuda_rng_state``, which initialize CUDA and raise. Safe: on the CPU the default CPU
    generator is the one every kernel, and the patched RNG tracker, draws from; saving and
    restoring it is what the CUDA calls do for the CUDA generator. The CPU state is then saved
    and restored twice (as "CPU" and as "CUDA" state, captured at the same moment), which
    restores the same state.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    _rebind(mcore_random, "_get_cuda_rng_state", get_state)
    _rebind(mcore_random, "_set_cuda_rng_state", set_state)


def _patch_checkpoint_without_output_fp8() -> None:
    """``CheckpointWithoutOutput`` asks Transformer Engine about FP8 only where TE is installed.

    Breaks: ``CheckpointWithoutOutput(fp8=False)``, how ``TransformerLayer`` builds the
    ``layernorm`` recompute (and the experts the ``moe_act`` one), sets ``self.fp8 = fp8 is not
    None``, i.e. True, and its forward then calls TE's ``FP8GlobalStateManager``: a ``NameError``
    without TE (both 0.16.1 and 0.19.2). Safe: the flag only means "ask TE whether FP8 is on";
    FP8 needs TE (and a GPU), so without TE the answer is no, which ``fp8 = False`` gives.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    if getattr(mcore_random, "HAVE_TE", False):
        return
    cls = mcore_random.CheckpointWithoutOutput
    original_init = cls.__init__

    @functools.wraps(original_init)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.fp8 = False

    cls.__init__ = init


def _patch_recompute_share_storage() -> None:
    """``CheckpointWithoutOutput`` hands its re-run's output over by copying, not by a compiled extension.

    Breaks: from 0.19, ``CheckpointWithoutOutput._recompute`` (``layernorm``, ``mla_up_proj``,
    ``moe_act`` recompute) calls ``random._get_share_storage()``, which JIT-compiles a C++ extension
    with ``torch.utils.cpp_extension.load_inline`` on first use: it needs a compiler, takes minutes
    on a small CPU, and a compile killed midway leaves a lock under ``~/.cache/torch_extensions``
    that makes every later process wait for it forever. Safe: the extension points the discarded
    output's storage (resized to 0 bytes in forward) at the recomputed tensor's; resizing that
    storage back and copying the recomputed bytes into it gives every view of the output the same
    values (what 0.16 does), at the cost of one copy and no zero-copy sharing.
    """
    from megatron.core.tensor_parallel import random as mcore_random

    if not hasattr(mcore_random, "_get_share_storage"):
        return  # 0.16: copies already

    def share_storage(output: torch.Tensor, recomputed: torch.Tensor) -> None:
        storage = output.untyped_storage()
        storage.resize_(recomputed.untyped_storage().nbytes())
        storage.copy_(recomputed.untyped_storage())

    _rebind(mcore_random, "_get_share_storage", lambda: share_storage)


def _patch_current_device() -> None:
    """``torch.cuda.current_device()`` returns the CPU device.

    Breaks: Megatron allocates buffers with ``device=torch.cuda.current_device()`` (the global
    memory buffer of core attention, DDP grad buffers, p2p shape tensors, ...), which initializes
    CUDA and raises. Safe: the call sites pass the value on as a ``device=`` argument or to
    ``.to()``, where ``torch.device("cpu")`` is accepted and means "where the model lives".
    """
    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_tensor_cuda() -> None:
    """``Tensor.cuda()`` returns the tensor itself.

    Breaks: Megatron moves data to "the device" with ``.cuda()`` (tied embeddings under pipeline
    parallelism, ``tensor_parallel.broadcast_data``, optimizer state restore). Without CUDA the call
    can only raise, so no working CPU program depends on it. Safe: the CPU is the device here, and
    the tensor is already on it.
    """

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.cuda = cuda


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by one Megatron module: factory calls with a CUDA device allocate on the CPU,
    and none asks for pinned memory.

    Every other attribute is torch's own (looked up once, then cached on the proxy).
    """

    _FACTORIES = frozenset(
        {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint"}
    )

    def __init__(self) -> None:
        super().__init__("torch", torch.__doc__)

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name in self._FACTORIES:
            value = self._on_cpu(value)
        setattr(self, name, value)
        return value

    @staticmethod
    def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(factory)
        def make(*args: Any, **kwargs: Any) -> torch.Tensor:
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            # No pinned-memory allocator without CUDA; pinning only speeds copies to a GPU.
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return make


# Modules that allocate with a literal ``device="cuda"`` (or pinned memory) on paths the CPU runs use.
_CUDA_LITERAL_MODULES = (
    "megatron.core.utils",  # calc_params_l2_norm
    "megatron.core.transformer.utils",  # default causal / sliding-window softmax masks
    "megatron.core.transformer.moe.moe_utils",  # aux-loss tracker (0.16)
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.optimizer.optimizer",  # found_inf, scale, grad-norm-group flags
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens
    "megatron.core.tensor_parallel.data",  # broadcast_data
    "megatron.core.models.common.embeddings.rope_utils",  # CP slicing: pin_memory=True
)


def _patch_cuda_literals() -> None:
    """Allocations with a literal ``device="cuda"`` land on the CPU, in the modules listed above.

    Breaks: optimizer scalars, grad-norm buffers, the schedules' token counter, softmax masks and
    ``broadcast_data`` allocate on ``"cuda"`` by name. Safe: each listed module's global ``torch``
    is replaced by ``_CpuTorch``, which changes only the ``device`` of factory calls that name CUDA
    (an allocation that could only fail here); all other torch use is untouched, and no other
    module sees the proxy.
    """
    proxy = _CpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if module.__dict__.get("torch") is torch:
            module.torch = proxy


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, ``Tensor.type()`` names CPU tensors as their CUDA counterparts."""
    original = torch.Tensor.type

    def type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original(self, *args, **kwargs)
        if args or kwargs or self.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


def _patch_type_checks() -> None:
    """Megatron's optimizers accept CPU parameters and gradients.

    Breaks: the distributed optimizer, the mixed-precision optimizer and gradient clipping sort or
    assert parameters by ``param.type() == "torch.cuda.FloatTensor"`` (or ``HalfTensor`` /
    ``BFloat16Tensor``) and reject anything else. Safe: during exactly those calls ``type()``
    reports a CPU tensor under its CUDA name; dtype, the only thing the checks are about, is
    unchanged, and nothing else observes the names.
    """
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    def with_cuda_names(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _cuda_type_names():
                return function(*args, **kwargs)

        return call

    for cls in (distrib_optimizer.DistributedOptimizer, optimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = with_cuda_names(cls.__init__)
    _rebind(
        clip_grads,
        "clip_grad_by_total_norm_fp32",
        with_cuda_names(clip_grads.clip_grad_by_total_norm_fp32),
    )


def _patch_torch_norm() -> None:
    """Torch LayerNorm/RMSNorm accept ``sequence_parallel`` and mark their parameters for it.

    Breaks: the local spec's ``WrappedTorchNorm`` asserts ``not config.sequence_parallel`` because
    torch's norms do not tag their weights; Megatron's TE/Apex norms set ``param.sequence_parallel``
    so that ``finalize_model_grads`` all-reduces the weight gradients over the tensor-parallel
    group (each rank only saw its sequence shard). Safe: a norm is per-token, so normalizing a
    sequence shard is the same math; the patch builds the norm as if sequence parallelism were off
    and then sets the same ``sequence_parallel`` attribute TE/Apex set, restoring the gradient
    reduction.
    """
    import copy

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def new(cls: type, config: Any, hidden_size: int, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        plain_config = copy.copy(config)
        plain_config.sequence_parallel = False
        norm = original_new(cls, plain_config, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = staticmethod(new)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is synchronous, so every wait is already met."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _NullStream:
        # One shared instance: code that compares "current stream != side stream" sees no side stream.
        if not hasattr(cls, "_instance"):
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()


class _NullEvent:
    """Stands in for ``torch.cuda.Event`` (see ``_NullStream``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _patch_streams() -> None:
    """``torch.cuda`` streams and events become no-ops.

    Breaks: the MoE all-to-all dispatcher creates a side ``torch.cuda.Stream`` for device-to-host
    copies of split sizes and synchronizes on an event; DDP and the optimizer use streams and
    events for overlap. Safe: on the CPU every kernel completes before the next Python statement,
    so the orderings these streams/events enforce already hold.
    """
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.default_stream = lambda device=None: _NullStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


def _patch_moe_te_gemm_name() -> None:
    """Define ``moe_utils.te_general_gemm = None`` when Transformer Engine is absent (0.16.x).

    Breaks: megatron-core 0.16.1 imports ``te_general_gemm`` only when TE imports, yet the router's
    gating linear tests ``te_general_gemm is not None`` unconditionally, a ``NameError`` without TE.
    Safe: ``None`` selects the plain ``torch.mm`` path, exactly what 0.19 does without TE.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_moe_split_sizes() -> None:
    """The all-to-all dispatcher hands gloo its split sizes as host numbers, as on GPU.

    Breaks: ``MoEAlltoAllTokenDispatcher`` turns its per-rank split sizes into numpy arrays with
    ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, which only acts on CUDA tensors; on the CPU
    the splits stay tensors and ``all_to_all_single`` rejects them. Safe: the replacement performs
    the same conversion for tensors already on the CPU (values unchanged; stream recording is
    moot without streams). It is replaced where the dispatcher imported it by name.
    """
    from megatron.core.transformer.moe import token_dispatcher

    def to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                return tensor.numpy()
        return tensor

    _rebind(token_dispatcher, "maybe_move_tensor_to_cpu", to_host)


def _patch_uneven_first_dim_collectives() -> None:
    """Uneven all-gather / reduce-scatter along the first dimension work on gloo.

    Breaks: with TP x EP the MoE dispatcher gathers (and in backward reduce-scatters) a different
    number of tokens per rank (``output_split_sizes`` / ``input_split_sizes``); gloo's list
    all-gather requires equal shapes. Safe: the replacements compute the same results with
    collectives gloo supports: the gather pads every rank's chunk to the largest, gathers, and
    drops the padding; the reduce-scatter all-reduces the whole input and keeps this rank's
    slice. Calls without split sizes go to Megatron's own functions unchanged.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather_equal = mappings._gather_along_first_dim
    reduce_scatter_equal = mappings._reduce_scatter_along_first_dim

    def gather(
        input_: torch.Tensor,
        group: Any,
        output_split_sizes: list[int] | None = None,
        use_global_buffer: bool = False,
    ) -> torch.Tensor:
        if output_split_sizes is None or group.size() == 1:
            return gather_equal(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(chunks, padded, group=group)
        return torch.cat(
            [chunk[:size] for chunk, size in zip(chunks, output_split_sizes, strict=True)], dim=0
        )

    def reduce_scatter(
        input_: torch.Tensor,
        group: Any,
        input_split_sizes: list[int] | None = None,
        use_global_buffer: bool = False,
    ) -> torch.Tensor:
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter_equal(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]].clone()

    _rebind(mappings, "_gather_along_first_dim", gather)
    _rebind(mappings, "_reduce_scatter_along_first_dim", reduce_scatter)


_PATCHES: tuple[Callable[[], None], ...] = (
    _patch_current_device,
    _patch_tensor_cuda,
    _patch_streams,
    _patch_cuda_literals,
    _patch_type_checks,
    _patch_rng_tracker,
    _patch_recompute_rng,
    _patch_checkpoint_without_output_fp8,
    _patch_recompute_share_storage,
    _patch_torch_norm,
    _patch_moe_te_gemm_name,
    _patch_moe_split_sizes,
    _patch_uneven_first_dim_collectives,
)


def enable_cpu_megatron() -> None:
    """Patch Megatron-Core so models, DDP, optimizers and schedules run on CPU over gloo.

    Idempotent. Raises ``RuntimeError`` if CUDA is available.
    """
    global _ENABLED
    if torch.cuda.is_available():
        raise RuntimeError(
            "enable_cpu_megatron() refuses to patch Megatron-Core on a machine with CUDA; "
            "GPU runs use NCCL and the unpatched code"
        )
    if _ENABLED:
        return
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    for patch in _PATCHES:
        patch()
    _ENABLED = True


def check_cpu_config(config: Any) -> None:
    """Raise ``ValueError`` naming every setting of a ``TransformerConfig`` this platform cannot run.

    - ``batch_p2p_comm`` with pipeline parallelism: over gloo the batched isend/irecv path
      silently swaps activations under virtual pipelining (PP=2, VPP=2: wrong losses from the
      third microbatch on); ``batch_p2p_comm=False`` uses plain ordered send/recv;
    - ``add_bias_linear`` with MoE: the expert path on CPU needs bias-free linears;
    - ``moe_grouped_gemm``, ``moe_permute_fusion``, ``gradient_accumulation_fusion``: CUDA-only
      kernels (Transformer Engine / grouped_gemm / APEX).
    Megatron itself already rejects MoE with tensor parallelism but without sequence parallelism.
    """
    problems = []
    if config.pipeline_model_parallel_size > 1 and config.batch_p2p_comm:
        problems.append("batch_p2p_comm=True with pipeline parallelism (set batch_p2p_comm=False)")
    if config.num_moe_experts and config.add_bias_linear:
        problems.append("add_bias_linear=True with MoE (set add_bias_linear=False)")
    for flag in ("moe_grouped_gemm", "moe_permute_fusion", "gradient_accumulation_fusion"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=True needs CUDA kernels (set {flag}=False)")
    if problems:
        raise ValueError("config cannot run on CPU/gloo: " + "; ".join(problems))


def is_enabled() -> bool:
    """Whether ``enable_cpu_megatron`` has patched this process."""
    return _ENABLED
