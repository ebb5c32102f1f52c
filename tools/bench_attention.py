"""Benchmark prefix-shared attention backends on a GPU (HH-RLHF length statistics).

1. Correctness: each backend against the reference (fp32 dense mask + SDPA) on a packed
   row of ``--check-len`` tokens, bf16 inputs: relative error (Frobenius) of the output
   and of dq, dk, dv must stay within bf16 range (``--tolerance``).
2. Speed: forward + backward of attention alone, over the same HH-RLHF groups laid out as

   * ``prefix-shared``: preference-packed rows (prompt once, then each response);
   * ``duplicated``: the same groups packed with the prompt written again per response;
   * ``causal``: plain causal attention over rows as many and as long as the
     prefix-shared ones (what an unmodified causal kernel does on packed rows);

   for a GQA shape (32 query heads, 8 kv heads, d=128) and the MLA shape of A.X K1
   (64 heads, qk 192, v 128). Useful work = the attention pairs the prefix-shared layout
   computes (identical for all three layouts); FLOPs follow flash-attn's convention:
   forward 2 * pairs * heads * (d_qk + d_v), forward + backward 3.5x that.

Token lengths: a tokenizer file (``--tokenizer``: tokenizer.json or SentencePiece .model),
else characters / 4. Run: ``python tools/bench_attention.py [--seq-len 8192 ...] [--json]``
(``--json``: one JSON object on stdout instead of the tables). Needs CUDA; without it the script
says so and exits with status 2. ``--device cpu`` is a smoke run of the same pipeline (the
``reference`` backend in bf16 against itself in fp32, CPU timings; give a short ``--seq-len``:
the reference builds an L x L mask). Exit status 1 when a backend failed its check or run. On
SIGTERM (a time limit) it stops and still reports what it measured (``"stopped"`` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DATA = (
    Path(__file__).resolve().parent.parent / "examples" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    kv_heads: int
    dqk: int
    dv: int


SHAPES = {
    "gqa": Shape("gqa", heads=32, kv_heads=8, dqk=128, dv=128),
    "mla": Shape("mla", heads=64, kv_heads=64, dqk=192, dv=128),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF style JSONL(.gz) (default: bundled)"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.json / .model; default chars/4"
    )
    parser.add_argument("--seq-len", type=int, default=8192, help="row length L (default 8192)")
    parser.add_argument("--rows", type=int, default=4, help="prefix-shared rows per timed batch (default 4)")
    parser.add_argument("--shapes", default="gqa,mla", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument(
        "--backends",
        default=None,
        help="comma list of backend names (default: every available varlen GPU kernel, and flex)",
    )
    parser.add_argument("--check-len", type=int, default=2048, help="row length of the correctness check")
    parser.add_argument("--tolerance", type=float, default=2e-2, help="max relative error vs fp32 reference")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda (default) or cpu: a smoke run of the reference backend at a short --seq-len",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
    return args


def group_lengths(data: Path, tokenizer_path: Path | None) -> Any:
    """``GroupLengths`` of the file's records: prompt tokens, response tokens + EOS."""
    from megatron_prefpack.data.packing import GroupLengths
    from megatron_prefpack.data.records import iter_records

    if tokenizer_path is None:

        def count(text: str) -> int:
            return max(1, math.ceil(len(text) / 4))
    else:
        from megatron_prefpack.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)

        def count(text: str) -> int:
            return max(1, len(tokenizer.encode(text)))

    prompts, responses = [], []
    for _, record in iter_records(data):
        if record.is_chat:
            raise SystemExit(f"{record.location}: chat records are not supported by this benchmark")
        prompts.append(count(record.prompt))
        responses.append([count(r) + 1 for r in record.responses])
    return GroupLengths.from_arrays(prompts, responses)


def layout_views(lengths: Any, layout: str, seq_len: int, max_rows: int | None) -> tuple[Any, Any, Any]:
    """Pack ``lengths`` in ``layout`` rows of ``seq_len``; return (doc_ids, segment_ids, group indices) of
    the first ``max_rows`` rows (all rows if None) as int64 tensors / a numpy array."""
    import numpy as np
    import torch

    from megatron_prefpack.data.groups import TokenizedGroup
    from megatron_prefpack.data.layout import token_views
    from megatron_prefpack.data.packing import PackingConfig, materialize_row, pack

    plan = pack(lengths, PackingConfig(seq_len=seq_len, layout=layout, skip_too_long=True))
    rows = plan.rows[:max_rows]
    index = {int(g): i for i, g in enumerate(lengths.group_ids)}

    def dummy_group(group_id: int) -> TokenizedGroup:
        i = index[group_id]
        start, end = lengths.offsets[i], lengths.offsets[i + 1]
        responses = [np.zeros(int(n), dtype=np.int32) for n in lengths.response[start:end]]
        return TokenizedGroup(group_id, np.zeros(int(lengths.prompt[i]), dtype=np.int32), responses)

    views = [token_views(materialize_row(row, dummy_group, plan.row_length, pad_id=0)) for row in rows]
    doc = torch.from_numpy(np.stack([v.doc_ids for v in views]))
    seg = torch.from_numpy(np.stack([v.segment_ids for v in views]))
    groups = np.unique([index[g] for row in rows for g, _ in row])
    return doc, seg, groups


def random_inputs(shape: Shape, batch: int, seq: int, seed: int, device: str) -> list[Any]:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    sizes = [(shape.heads, shape.dqk), (shape.kv_heads, shape.dqk), (shape.kv_heads, shape.dv)]
    return [
        torch.randn(batch, seq, h, d, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
        for h, d in sizes
    ]


def elapsed_ms(fn: Callable[[], Any], device: str) -> float:
    """Wall time of ``fn()`` in ms: CUDA events around it on the GPU, ``perf_counter`` on the CPU."""
    import torch

    if device != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def forward_backward(backend: Any, inputs: list[Any], plan: Any, scale: float, out_grad: Any) -> list[Any]:
    for t in inputs:
        t.grad = None
    out = backend.attend(*inputs, plan, scale)
    out.backward(out_grad)
    return [out.detach(), *(t.grad for t in inputs)]


def check_backend(name: str, shape: Shape, doc: Any, seg: Any, args: argparse.Namespace) -> dict[str, float]:
    """Relative errors (out, dq, dk, dv) of ``name`` in bf16 vs the fp32 reference; raises
    ``AssertionError`` naming them beyond ``--tolerance``."""
    import torch

    from megatron_prefpack.attention import get_backend

    scale = 1 / math.sqrt(shape.dqk)
    inputs = random_inputs(shape, doc.shape[0], doc.shape[1], args.seed, args.device)
    out_grad = torch.randn(*doc.shape, shape.heads, shape.dv, device=args.device, dtype=torch.bfloat16)
    reference = get_backend("reference")
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    expected = forward_backward(
        reference, ref_inputs, reference.build_plan(doc, seg), scale, out_grad.float()
    )
    backend = get_backend(name)
    actual = forward_backward(backend, inputs, backend.build_plan(doc, seg), scale, out_grad)
    errors = {
        label: float((a.float() - e).norm() / e.norm())
        for label, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True)
    }
    if not max(errors.values()) <= args.tolerance:
        raise AssertionError(f"relative error above {args.tolerance}: {format_errors(errors)}")
    return errors


def format_errors(errors: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.1e}" for k, v in errors.items())


def time_layout(name: str, shape: Shape, doc: Any, seg: Any, args: argparse.Namespace) -> tuple[float, float]:
    """(plan-build ms, forward+backward ms) of backend ``name`` on rows ``doc``/``seg``."""
    import torch

    from megatron_prefpack.attention import get_backend

    backend = get_backend(name, args.device)
    backend.build_plan(doc, seg)  # warm (flex compiles the block-mask builder)
    plans = []
    plan_ms = elapsed_ms(lambda: plans.append(backend.build_plan(doc, seg)), args.device)
    inputs = random_inputs(shape, doc.shape[0], doc.shape[1], args.seed, args.device)
    out_grad = torch.randn(*doc.shape, shape.heads, shape.dv, device=args.device, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(shape.dqk)

    def repeat(times: int) -> None:
        for _ in range(times):
            forward_backward(backend, inputs, plans[0], scale, out_grad)

    repeat(args.warmup)
    return plan_ms, elapsed_ms(lambda: repeat(args.iters), args.device) / args.iters


def default_backends(device: str) -> list[str]:
    from megatron_prefpack.attention.backends.varlen import GPU_KERNELS, kernel_available

    if device != "cuda":
        return ["reference"]
    return [f"varlen:{k}" for k in GPU_KERNELS if kernel_available(k)] + ["flex"]


def run(args: argparse.Namespace) -> int:
    say = (lambda *a, **k: None) if args.json else print
    result: dict[str, Any] = {"stopped": None, "shapes": {}}
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print(
                "bench_attention: no CUDA device; this benchmark needs a GPU (run it on an H100/H200 "
                "node, or --device cpu for a smoke run)",
                file=sys.stderr,
            )
            return 2
        bench(args, result, say)
    except Stopped:  # a time limit: report what was measured
        result["stopped"] = "SIGTERM before the end; the backend running then is marked"
        for shape in result["shapes"].values():
            for entry in shape["backends"].values():
                if not entry["ok"] and entry["error"] is None:
                    entry["error"] = "stopped by SIGTERM before it finished"
    finally:
        signal.signal(signal.SIGTERM, previous)
    failures = sum(not b["ok"] for shape in result["shapes"].values() for b in shape["backends"].values())
    result["failures"] = failures
    if args.json:
        print(json.dumps(result, indent=1))
    return 1 if failures or result["stopped"] else 0


def bench(args: argparse.Namespace, result: dict[str, Any], say: Callable[..., None]) -> None:
    """Lay out the groups, then :func:`measure`; everything goes into ``result``."""
    import numpy as np
    import torch

    from megatron_prefpack.data.packing import causal_attention_pairs

    torch.manual_seed(args.seed)
    backends = args.backends.split(",") if args.backends else default_backends(args.device)
    lengths = group_lengths(args.data, args.tokenizer)
    tokens = "chars/4" if args.tokenizer is None else str(args.tokenizer)
    say(f"{lengths.num_groups} groups from {args.data}; tokens: {tokens}")

    check_doc, check_seg, _ = layout_views(lengths, "prefpack", args.check_len, 1)
    # Only groups that fit a row in every layout, so that the duplicated rows hold the same groups.
    lengths = lengths.select(np.flatnonzero(lengths.fits_every_layout(args.seq_len)))
    pref_doc, pref_seg, groups = layout_views(lengths, "prefpack", args.seq_len, args.rows)
    selected = lengths.select(groups)
    dup_doc, dup_seg, _ = layout_views(selected, "duplicated", args.seq_len, None)
    causal = torch.zeros_like(pref_doc)
    layouts = {
        "prefix-shared": (pref_doc, pref_seg),
        "duplicated": (dup_doc, dup_seg),
        "causal": (causal, causal),
    }
    layouts = {k: (d.to(args.device), s.to(args.device)) for k, (d, s) in layouts.items()}
    check_doc, check_seg = check_doc.to(args.device), check_seg.to(args.device)
    pairs = {
        "prefix-shared": int(selected.attention_pairs("prefpack").sum()),
        "duplicated": int(selected.attention_pairs("duplicated").sum()),
        "causal": int(pref_doc.shape[0] * causal_attention_pairs(args.seq_len)),
    }
    result.update(
        {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": "bfloat16",
            "data": str(args.data),
            "tokens": tokens,
            "seq_len": args.seq_len,
            "check_len": args.check_len,
            "tolerance": args.tolerance,
            "iters": args.iters,
            "groups": selected.num_groups,
            "responses": int(selected.num_responses.sum()),
            "layouts": {
                k: {"rows": int(v[0].shape[0]), "attention_pairs": pairs[k]} for k, v in layouts.items()
            },
        }
    )
    say(
        f"{selected.num_groups} groups, {result['responses']} responses; rows of {args.seq_len}: "
        + ", ".join(f"{k} {v[0].shape[0]} rows / {pairs[k]:.3e} pairs" for k, v in layouts.items())
    )

    measure(result, backends, layouts, (check_doc, check_seg), pairs["prefix-shared"], args, say)


class Stopped(BaseException):
    """SIGTERM arrived (e.g. a time limit): stop measuring and report what was measured."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped


def measure(
    result: dict[str, Any],
    backends: list[str],
    layouts: dict[str, tuple[Any, Any]],
    check: tuple[Any, Any],
    useful_pairs: int,
    args: argparse.Namespace,
    say: Callable[..., None],
) -> None:
    """Check and time every backend on every shape and layout; results go into
    ``result["shapes"]`` as they come (a backend that raises is recorded and skipped)."""
    for shape in (SHAPES[s] for s in args.shapes.split(",")):
        useful_flops = 3.5 * 2 * useful_pairs * shape.heads * (shape.dqk + shape.dv)
        shape_result: dict[str, Any] = {**vars(shape), "useful_flops": useful_flops, "backends": {}}
        result["shapes"][shape.name] = shape_result
        say(
            f"\n== {shape.name}: {shape.heads} q heads, {shape.kv_heads} kv heads, d_qk {shape.dqk}, d_v {shape.dv}"
        )
        say(
            f"{'backend':<18} {'layout':<14} {'rows':>4} {'plan ms':>8} {'fwd+bwd ms':>11} {'useful TFLOP/s':>15} {'x prefix-shared':>16}"
        )
        for name in backends:
            entry: dict[str, Any] = {"ok": False, "error": None, "check": None, "layouts": {}}
            shape_result["backends"][name] = entry
            try:
                entry["check"] = check_backend(name, shape, *check, args)
                say(f"{name:<18} check vs reference: {format_errors(entry['check'])}")
                for layout, (doc, seg) in layouts.items():
                    plan_ms, ms = time_layout(name, shape, doc, seg, args)
                    base = entry["layouts"].get("prefix-shared", {}).get("fwd_bwd_ms", ms)
                    entry["layouts"][layout] = {
                        "rows": int(doc.shape[0]),
                        "plan_ms": plan_ms,
                        "fwd_bwd_ms": ms,
                        "useful_tflops": useful_flops / ms / 1e9,
                        "time_ratio_vs_prefix_shared": ms / base,
                    }
                    say(
                        f"{name:<18} {layout:<14} {doc.shape[0]:>4} {plan_ms:>8.2f} {ms:>11.2f} "
                        f"{useful_flops / ms / 1e9:>15.1f} {ms / base:>16.2f}"
                    )
                entry["ok"] = True
            except Exception as error:  # report and continue with the next backend
                entry["error"] = f"{type(error).__name__}: {error}"
                say(f"{name:<18} FAILED: {entry['error']}")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
