"""Graceful preemption: on SIGTERM (Slurm's warning before a kill) finish the step, save, exit 0.

Slurm signals every task, but not at the same instant, so the decision to stop is taken
collectively: :meth:`PreemptionWatcher.should_stop` all-reduces the local flag (MAX) so all
ranks leave the loop after the same step and save one consistent checkpoint.
"""

from __future__ import annotations

import signal
import types

import torch
import torch.distributed as dist


class PreemptionWatcher:
    """Records SIGTERM (and optionally other signals) instead of dying on it.

    Use as a context manager around the training loop; the previous handlers are restored
    on exit. ``should_stop()`` is collective when torch.distributed is initialised.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> PreemptionWatcher:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank iff any rank received a signal (one small all-reduce)."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
