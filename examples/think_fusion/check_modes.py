"""Think-Fusion demo, last step: does each model answer in the mode its marker requests?

For every exported model (``--model NAME=HF_DIR``, loaded with transformers'
``AutoModelForCausalLM``, fp32) and every held-out prompt (the first ``--prompts`` groups of
the preprocessed held-out set, so each prompt is cut exactly as in training), each mode is
requested by prefilling its marker after the prompt (``/think`` or ``/no_think``, one token),
and ``generate`` continues greedily for ``--max-new-tokens`` tokens. The answer is in thinking
mode iff it holds a think tag, ``<think>`` or ``</think>`` (a model may skip the opening tag and
still write reasoning that it closes), before any mode marker the model writes itself (a marker
opens a new response: tiny models run on past their answer into "/think<think> ...", which
says nothing about the mode of the answer asked for). It is right iff that matches the request.
Also recorded: whether the continuation starts with ``<think>`` and the probability of
``<think>`` as the first token.

Prints a table of mode accuracy per model and requested mode, and whether the fused model's
overall accuracy beats both parents' (reported, never asserted), and writes every per-prompt
result and the table's numbers to ``--json``.

  python examples/think_fusion/check_modes.py --data think_fusion_out/data/heldout \\
      --tokenizer think_fusion_out/tokenizer.model --model think=think_fusion_out/hf/think ... \\
      --json think_fusion_out/modes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_prefpack.data.group_dataset import GroupDataset
from megatron_prefpack.data.mode_overlap import (
    DEFAULT_PLAIN_MARKER,
    DEFAULT_THINK_MARKER,
    MODES,
    THINK_CLOSE,
    THINK_OPEN,
)
from megatron_prefpack.data.tokenizers import Tokenizer, load_tokenizer

MARKERS = {"thinking": DEFAULT_THINK_MARKER, "plain": DEFAULT_PLAIN_MARKER}


def single_id(tokenizer: Tokenizer, piece: str) -> int:
    """The one token of ``piece``; exits with a message if the tokenizer splits it."""
    ids = tokenizer.encode(piece)
    if len(ids) != 1:
        sys.exit(f"check_modes: {piece!r} is not one token of {tokenizer.path} ({ids})")
    return ids[0]


def is_thinking(generated: list[int], tags: set[int], markers: set[int]) -> bool:
    """Whether ``generated`` holds a think tag before the first mode marker (see the docstring)."""
    for token in generated:
        if token in markers:
            return False
        if token in tags:
            return True
    return False


def ask_all(
    model: torch.nn.Module,
    prompts: list[np.ndarray],
    ids: dict[str, int],
    eos: int,
    new: int,
    batch: int = 64,
) -> list[dict]:
    """Every prompt in every mode: the greedy continuation of prompt + marker and its mode
    (``ids`` maps the markers and tags to their tokens). Questions of one input length share a
    ``generate`` batch, so no padding is involved; a continuation ends at its EOS."""
    questions = [(i, mode) for i in range(len(prompts)) for mode in MODES]
    by_length: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for i, mode in questions:
        by_length[len(prompts[i]) + 1].append((i, mode))
    think, tags = ids[THINK_OPEN], {ids[THINK_OPEN], ids[THINK_CLOSE]}
    markers = {ids[m] for m in MARKERS.values()}
    answers = {}
    for length, group in by_length.items():
        for start in range(0, len(group), batch):
            chunk = group[start : start + batch]
            inputs = torch.from_numpy(
                np.stack([np.append(prompts[i], ids[MARKERS[mode]]) for i, mode in chunk]).astype(np.int64)
            )
            out = model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
                output_scores=True,
                return_dict_in_generate=True,
            )
            first = torch.softmax(out.scores[0].double(), dim=-1)[:, think]
            for row, question in enumerate(chunk):
                generated = out.sequences[row, length:].tolist()
                generated = generated[: generated.index(eos) + 1] if eos in generated else generated
                answers[question] = {
                    "generated": generated,
                    "thinking": is_thinking(generated, tags, markers),
                    "starts_with_think": bool(generated) and generated[0] == think,
                    "p_think_first": float(first[row]),
                }
    return [{"prompt": i, "mode": mode, **answers[(i, mode)]} for i, mode in questions]


def accuracy(results: list[dict]) -> dict[str, float]:
    """Fraction right per requested mode and overall."""
    right = {
        mode: [r["thinking"] == (r["mode"] == "thinking") for r in results if r["mode"] == mode]
        for mode in MODES
    }
    table = {mode: float(np.mean(values)) for mode, values in right.items()}
    table["overall"] = float(np.mean(right["thinking"] + right["plain"]))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the preprocessed held-out prompts")
    parser.add_argument(
        "--tokenizer", required=True, help="the demo tokenizer (markers and tags are one token)"
    )
    parser.add_argument(
        "--model", action="append", required=True, metavar="NAME=HF_DIR", help="an exported model (repeat)"
    )
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts to ask (default 64)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="greedy tokens per answer (default 16)"
    )
    parser.add_argument("--fused", default="fused", help="the fused model's NAME")
    parser.add_argument("--parents", nargs=2, default=["think", "plain"], help="the parents' NAMEs")
    parser.add_argument("--json", required=True, help="write every result and the table here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(args.tokenizer)
    ids = {piece: single_id(tokenizer, piece) for piece in (*MARKERS.values(), THINK_OPEN, THINK_CLOSE)}
    dataset = GroupDataset(args.data)
    prompts = [dataset[i].prompt for i in range(min(args.prompts, len(dataset)))]
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "markers": MARKERS,
        "models": {},
    }
    for spec in args.model:
        name, _, hf_dir = spec.partition("=")
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        results = ask_all(model, prompts, ids, tokenizer.eos_id, args.max_new_tokens)
        report["models"][name] = {"hf_dir": hf_dir, "accuracy": accuracy(results), "results": results}

    models = report["models"]
    print(
        f"mode accuracy on {len(prompts)} held-out prompts x 2 requested modes (greedy, {args.max_new_tokens} "
        f"tokens; thinking = a think tag before any marker the model writes):"
    )
    print(
        f"  {'model':<8}{'/think':>9}{'/no_think':>11}{'overall':>9}   P({THINK_OPEN} first) after /think, /no_think"
    )
    for name, entry in models.items():
        acc = entry["accuracy"]
        p_first = [
            np.mean([r["p_think_first"] for r in entry["results"] if r["mode"] == mode]) for mode in MODES
        ]
        print(
            f"  {name:<8}{acc['thinking']:>9.1%}{acc['plain']:>11.1%}{acc['overall']:>9.1%}   "
            f"{p_first[0]:.3f}, {p_first[1]:.3f}"
        )
    if args.fused in models and all(p in models for p in args.parents):
        fused = models[args.fused]["accuracy"]["overall"]
        parents = {p: models[p]["accuracy"]["overall"] for p in args.parents}
        beats = all(fused > value for value in parents.values())
        report["fused_beats_both_parents"] = beats
        versus = ", ".join(f"{p} {v:.1%}" for p, v in parents.items())
        print(
            f"the fused model {'beats' if beats else 'does not beat'} both parents on overall mode accuracy: "
            f"{fused:.1%} vs {versus}"
        )
        for mode in MODES:
            sample = next(r for r in models[args.fused]["results"] if r["mode"] == mode)
            print(f"  fused, prompt 0, {MARKERS[mode]}: {tokenizer.decode(sample['generated'])!r}")
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"per-prompt results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
