"""Reference-model log-probs: ``prefpack ref-logprobs`` (offline) and the in-job frozen model.

File format (offline): ``PATH`` is a ``.npy`` float64 array of shape ``(G, K)``, row ``g`` =
group id ``g`` of the dataset, column ``k`` = response index; entry = the reference model's
log-prob sum of that response given its prompt (NaN: response absent). Beside it,
``PATH.json`` records the dataset (its path and content fingerprint), the model config and the
checkpoint used (path, step, manifest digest). Keyed by ``(group_id, response_index)``, it
serves any packing layout, micro-batch size or resume; a table whose recorded dataset
fingerprint (or, when the run names ``reference.load``, checkpoint) differs from the run's is
refused, so a table from another preprocessing of the same file cannot be used by mistake.

Online: a frozen copy of the reference model runs a forward-only pipeline pass over the
step's micro-batches before the policy's step; the last pipeline stage keeps the sums in a
:class:`ReferenceLogps` for that step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_prefpack.data.batch import RowBatch
from megatron_prefpack.models.forward import cp_local

FORMAT = "prefpack-ref-logprobs/1"


class ReferenceLogps:
    """A ``(G, K)`` float64 table of reference log-prob sums (NaN = unknown); call it with a
    batch to get the ``(N,)`` float32 sums of the batch's responses."""

    def __init__(self, table: np.ndarray, source: str = "<in memory>", header: dict | None = None) -> None:
        self.table = table
        self.source = source
        self.header = header or {}

    @classmethod
    def load(cls, path: str | Path, dataset: Any, reference_load: str | None = None) -> ReferenceLogps:
        """Read the table at ``path`` for ``dataset`` (a ``GroupDataset``), checking its header:
        the dataset fingerprint and group count must match, and so must the reference
        checkpoint when ``reference_load`` names one. Raises ``ConfigError`` naming the file."""
        from megatron_prefpack.data.json_files import read_json_object
        from megatron_prefpack.training import checkpoint
        from megatron_prefpack.training.config import ConfigError

        header = read_json_object(Path(f"{path}.json"), ConfigError)
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: {err}") from None
        if header.get("format") != FORMAT or table.ndim != 2 or table.dtype != np.float64:
            raise ConfigError(
                f"{path}: not a {FORMAT} table (header format {header.get('format')!r}, array "
                f"{table.dtype} {table.shape}); write it with prefpack ref-logprobs"
            )
        recorded = header.get("dataset_fingerprint")
        if recorded != dataset.fingerprint or table.shape[0] != len(dataset):
            raise ConfigError(
                f"{path}: computed on dataset {header.get('dataset')} (fingerprint {str(recorded)[:16]}, "
                f"{table.shape[0]} groups), but data.path is {dataset.directory} (fingerprint "
                f"{dataset.fingerprint[:16]}, {len(dataset)} groups): recompute it with prefpack ref-logprobs"
            )
        if reference_load is not None:
            wanted = checkpoint.identity(reference_load)
            if header.get("checkpoint") != wanted:
                raise ConfigError(
                    f"{path}: computed from checkpoint {header.get('checkpoint')}, but reference.load "
                    f"is {wanted}: recompute it, or drop reference.load"
                )
        return cls(table, str(path), header)

    def describe(self) -> str:
        """Where the table came from, for the log."""
        ckpt = self.header.get("checkpoint")
        origin = "a random initialisation" if ckpt is None else f"{ckpt['path']} (step {ckpt['step']})"
        return f"{self.source}, computed from {origin}"

    def __call__(self, batch: RowBatch) -> torch.Tensor:
        gids = batch.response_group_ids.cpu().numpy()
        ks = batch.response_indices.cpu().numpy()
        if ks.size and int(ks.max()) >= self.table.shape[1]:
            raise ValueError(
                f"{self.source}: response index {int(ks.max())} beyond {self.table.shape[1]} columns"
            )
        values = np.asarray(self.table[gids, ks])
        missing = np.isnan(values)
        if missing.any():
            pairs = list(zip(gids[missing].tolist(), ks[missing].tolist(), strict=True))[:5]
            raise ValueError(f"{self.source}: no reference log-prob for (group, response) {pairs}")
        return torch.from_numpy(values.astype(np.float32)).to(batch.tokens.device)


def _reference_loss(batch: RowBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from megatron.core import parallel_state as ps

    from megatron_prefpack.losses.logprobs import allreduce_response_sums, response_logprobs

    sums = response_logprobs(output, batch.labels, batch.response_slots, batch.num_responses)
    sums = allreduce_response_sums(sums, ps.get_context_parallel_group())
    values = {
        "group_ids": batch.response_group_ids.cpu(),
        "response_indices": batch.response_indices.cpu(),
        "logps": sums.detach().double().cpu(),
    }
    return sums.sum() * 0.0, values


def _forward_step(
    model_forward: Any, data_iterator: Iterator[Any], model: torch.nn.Module
) -> tuple[Any, Any]:
    item = next(data_iterator)
    return model_forward(model, item.batch), partial(_reference_loss, cp_local(item.batch))


@torch.no_grad()
def forward_reference(
    chunks: list[torch.nn.Module], batches: list[RowBatch], model_forward: Any
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Forward-only pass of the (frozen) model over ``batches``: per micro-batch
    ``(group_ids, response_indices, logp_sums)`` on the last pipeline stage, [] elsewhere.
    The chunks run in eval mode and get their train/eval modes back afterwards."""
    from megatron_prefpack.training.step import MicroBatch, run_schedule

    modes = [(module, module.training) for chunk in chunks for module in chunk.modules()]
    for chunk in chunks:
        chunk.eval()
    items = [MicroBatch(b, 1) for b in batches]
    try:
        outputs = run_schedule(chunks, items, partial(_forward_step, model_forward), forward_only=True)
    finally:
        for module, mode in modes:
            module.training = mode
    return [(o["group_ids"].numpy(), o["response_indices"].numpy(), o["logps"].numpy()) for o in outputs]


def table_from(
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray]], shape: tuple[int, int]
) -> np.ndarray:
    """Scatter ``forward_reference`` results into a NaN-filled ``shape`` table."""
    table = np.full(shape, np.nan, dtype=np.float64)
    for gids, ks, logps in results:
        table[gids, ks] = logps
    return table


class OnlineReference:
    """The reference model inside the training job; :meth:`prepare` runs it over the
    micro-batches about to be used and returns the lookup for them (last stage only).

    ``chunks`` is a frozen copy (``reference.mode: online``), or the training chunks themselves
    with ``context`` = their LoRA adapters switched off (``base``: the same forward-only
    schedule, so it runs under every layout the training step does)."""

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        model_forward: Any,
        num_groups: int,
        max_responses: int,
        context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ):
        self.chunks = chunks
        self.model_forward = model_forward
        self.shape = (num_groups, max_responses)
        self.context = context

    def prepare(self, batches: list[RowBatch]) -> ReferenceLogps:
        with self.context():
            results = forward_reference(self.chunks, batches, self.model_forward)
        return ReferenceLogps(table_from(results, self.shape), "online reference")


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the training config (data, model, parallel layout)")
    parser.add_argument(
        "--load", default=None, help="reference checkpoint (default: reference.load, else checkpoint.load)"
    )
    parser.add_argument("--output", required=True, help="where to write the (groups, responses) .npy table")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from megatron_prefpack.data.group_dataset import DatasetError
    from megatron_prefpack.training.checkpoint import CheckpointError
    from megatron_prefpack.training.config import ConfigError, load_config

    overrides = [*args.set, *args.overrides]
    if args.load is not None:  # the checkpoint to read: the config's own checkpoint.load may not exist yet
        overrides.append(f"checkpoint.load={args.load}")
    try:
        cfg = load_config(args.config, overrides, check_reference=False)
        load = args.load or cfg.reference.load or cfg.checkpoint.load
        write_reference_logprobs(cfg, load, Path(args.output))
    except (ConfigError, DatasetError, CheckpointError) as err:
        print(f"prefpack ref-logprobs: {err}", file=sys.stderr)
        return 2
    return 0


def write_reference_logprobs(cfg: Any, load: str | None, output: Path) -> Path:
    """Compute the reference log-prob table of the whole dataset (both splits) and write it.

    Collective; rank 0 writes ``output`` (atomically) and ``output.json``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_prefpack.data.group_dataset import GroupDataset
    from megatron_prefpack.data.packing import GroupLengths, PackingConfig, pack
    from megatron_prefpack.data.sampler import PackedRowDataset
    from megatron_prefpack.platform import distributed as platform
    from megatron_prefpack.training import checkpoint
    from megatron_prefpack.training.config import check_parallel_layout, model_config
    from megatron_prefpack.training.model_setup import (
        build_chunks,
        init_distributed,
        init_tp_comm_overlap,
        make_model_forward,
        transformer_config,
    )
    from megatron_prefpack.training.step import is_reporting_rank

    start = time.perf_counter()
    init_distributed(cfg)
    try:
        model_cfg = model_config(cfg)
        check_parallel_layout(cfg, dist.get_world_size(), model_cfg)
        par = cfg.parallel
        tcfg = transformer_config(cfg, model_cfg)
        init_tp_comm_overlap(cfg, model_cfg)
        chunks = build_chunks(model_cfg, tcfg)
        if load is None:
            print("[prefpack] warning: no reference checkpoint given; using the random initialisation")
        else:
            checkpoint.load(load, chunks, restore_rng=False)
        dataset = GroupDataset(cfg.data.path)
        lengths = dataset.token_lengths()
        ids = np.arange(len(dataset), dtype=np.int64)
        plan = pack(
            GroupLengths(lengths.prompt, lengths.response, lengths.response_offsets, ids),
            PackingConfig(
                seq_len=cfg.data.seq_len,
                tensor_parallel=par.tensor,
                context_parallel=par.context,
                sequence_parallel=par.sequence_parallel,
                skip_too_long=cfg.data.skip_too_long,
            ),
        )
        pad_id = dataset.pad_id
        rows = PackedRowDataset(plan, dataset.__getitem__, pad_id)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mbs = cfg.data.micro_batch_size
        chunk_rows = [list(range(s, min(s + mbs, plan.num_rows))) for s in range(0, plan.num_rows, mbs)]
        per_rank = math.ceil(len(chunk_rows) / dp)
        # Every rank runs the same number of micro-batches (EP all-to-alls span DP ranks);
        # fillers repeat chunk 0, whose values are identical anyway.
        mine = [
            chunk_rows[i * dp + dp_rank] if i * dp + dp_rank < len(chunk_rows) else chunk_rows[0]
            for i in range(per_rank)
        ]
        if par.pipeline > 1:  # pipeline stages exchange fixed-shape tensors: full micro-batches only
            mine = [c if len(c) == mbs else (c * mbs)[:mbs] for c in mine]
        max_k = int(lengths.num_responses.max())
        results = forward_reference(chunks, [rows.batch(c) for c in mine], make_model_forward(model_cfg))
        gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(results if is_reporting_rank() else [], gathered, dst=0)
        if gathered is not None:
            table = table_from([r for part in gathered for r in part], (len(dataset), max_k))
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp = output.with_name(output.name + ".tmp.npy")
            np.save(tmp, table)
            tmp.replace(output)
            header = {
                "format": FORMAT,
                "dataset": str(Path(cfg.data.path).resolve()),
                "dataset_fingerprint": dataset.fingerprint,
                "num_groups": len(dataset),
                "max_responses": max_k,
                "skipped_group_ids": list(plan.skipped_group_ids),
                "checkpoint": None if load is None else checkpoint.identity(load),
                "model": model_cfg.to_dict(),
            }
            output.with_name(output.name + ".json").write_text(json.dumps(header, indent=1) + "\n")
            known = int((~np.isnan(table)).sum())
            print(
                f"[prefpack] wrote {output}: {known} response log-probs of {len(dataset)} groups "
                f"({len(plan.skipped_group_ids)} groups skipped as too long) in {time.perf_counter() - start:.1f} s"
            )
        dist.barrier()
    finally:
        platform.destroy()
    return output
