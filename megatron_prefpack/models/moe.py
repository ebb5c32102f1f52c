"""MoE pieces for the layer spec's ``mlp`` slot.

A.X K1 normalises the MoE block's output (routed experts + shared expert) with an extra RMSNorm
before the residual add. :class:`PostNormMoELayer` is Megatron's ``MoELayer`` with that norm applied
in ``postprocess`` (the step that joins routed and shared outputs), so every ``MoELayer`` code path
(recompute, partial CUDA graphs, ``isinstance(mlp, MoELayer)`` checks in ``TransformerLayer``) is
kept.

Pad tokens and routing: both supported Megatron versions (0.16.1, 0.19.2) take a ``padding_mask``
``(B, S)`` bool (True = pad) in ``GPTModel.forward`` and hand it to the router, which drops pad
tokens from the aux-loss token counts and probabilities, the z-loss and the expert-bias load
counts. :func:`megatron_prefpack.models.forward.model_forward` passes it. Both versions break on
the expert-bias count (``routing_map & ~padding_mask`` broadcasts ``(T, E)`` against ``(T,)``);
:class:`PadAwareTopKRouter` in the spec's ``router`` slot fixes that one step. Pad tokens are still
dispatched to their top-k experts (their outputs are discarded by the loss); with dropless routing
that cannot change any real token's output.

Performance settings (``performance.moe_*``): the router returns Megatron's own ``(probs,
routing_map)``, ``(T, E)`` each, every token (pads included) with ``top_k`` experts of positive
weight. That is all any token dispatcher (``alltoall``, ``allgather``, ``flex``) and either expert
layout (per-expert ``SequentialMLP``, grouped ``TEGroupedMLP``) read; the routing statistics are
computed in the router, before dispatch, so they ignore pads with every dispatcher. ``flex``
(DeepEP) rebuilds each token's experts as the ``top_k`` largest probabilities, which recovers
this map exactly (``tests/test_moe_perf.py``). :class:`PostNormMoELayer` norms the result of
``MoELayer.postprocess``, which runs the dispatcher's ``combine_postprocess`` first, where the
shared expert's output is added under ``moe_shared_expert_overlap``: the norm sees routed +
shared output in every mode.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor


class PostNormMoELayer(MoELayer):
    """``MoELayer`` followed by a norm over its combined output.

    ``post_norm`` (give it through the ModuleSpec's ``params``): the norm class or spec, built like
    Megatron's layer norms (``config``, ``hidden_size``, ``eps``); the builder uses the same
    implementation as the block's final norm (``TENorm`` with TE, the local norm otherwise), so it
    handles sequence parallelism the same way.
    """

    def __init__(self, *args: Any, post_norm: type | ModuleSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.post_norm = build_module(
            post_norm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )

    def postprocess(self, output: Tensor, shared_expert_output: Tensor | None) -> Tensor:
        return self.post_norm(super().postprocess(output, shared_expert_output))


class PadAwareTopKRouter(TopKRouter):
    """``TopKRouter`` whose expert-bias load counts skip pad tokens.

    ``padding_mask``: ``(T,)`` bool, True = pad, as Megatron's router flattens it. Megatron's own
    ``_apply_expert_bias`` combines it with the ``(T, E)`` routing map without a trailing axis,
    which raises for any ``E != T``.
    """

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None) -> None:
        if padding_mask is not None:
            routing_map = routing_map & ~padding_mask.reshape(-1, 1)
        super()._apply_expert_bias(routing_map)
