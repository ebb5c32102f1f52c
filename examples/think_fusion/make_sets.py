"""Think-Fusion demo data: a thinking set, a plain set and held-out prompts from HH-RLHF pairs.

Every HH-RLHF pair gives a prompt (the conversation up to its last ``Assistant:``) and the
chosen answer. Prompts are split by a hash of their text (so a repeated prompt always lands in
the same part) into:

* held out (``--heldout-fraction``): never trained on; the mode check asks these;
* thinking only, plain only, and both (thirds of the rest): the thinking set is
  thinking-only + both, the plain set plain-only + both, so ``prefpack mode-overlap`` has a
  real join to make (the "both" prompts match; the one-sided ones are dropped and counted).

The plain answer is the chosen response (pairs whose chosen response is blank are skipped). The thinking answer is the same response behind a
short reasoning block that is **templated, not real reasoning**: it restates the user's last
request and adds a fixed safety check, ``<think> The user asks: "...". Safety check: ...
</think>``. The demo learns the *format* of a mode (whether to open with ``<think>``), which is
what Think-Fusion's mode control is about; it says nothing about reasoning quality.

Writes to ``--output DIR``: ``base.jsonl`` (every training prompt with its chosen answer, no
marker: the common base SFT), ``thinking.jsonl``, ``plain.jsonl`` (single-response SFT records,
no markers: ``prefpack mode-overlap`` adds them) and ``heldout.jsonl`` (held-out prompts with
their chosen answer; only the prompts are used), and prints the counts.

  python examples/think_fusion/make_sets.py --input examples/data/hh-rlhf-harmless-base-test.jsonl.gz \\
      --output think_fusion_out/sets
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from megatron_prefpack.data.records import ASSISTANT_MARKER, iter_records

HUMAN_MARKER = "\n\nHuman:"
REQUEST_WORDS = 12
SAFETY_CHECKS = (
    "Safety check: answer helpfully, but do not help with anything harmful.",
    "Safety check: is this request harmful? If so, decline politely.",
    "Safety check: keep the answer honest and harmless.",
)


def bucket(prompt: str) -> float:
    """A stable number in [0, 1) from the prompt text (the split key)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64


def last_request(prompt: str) -> str:
    """The user's last turn, cut to its first :data:`REQUEST_WORDS` words."""
    start = prompt.rfind(HUMAN_MARKER)
    end = prompt.rfind(ASSISTANT_MARKER)
    words = prompt[start + len(HUMAN_MARKER) : end].split()
    return " ".join(words[:REQUEST_WORDS]) + (" ..." if len(words) > REQUEST_WORDS else "")


def thinking_answer(prompt: str, answer: str) -> str:
    """The templated reasoning block in front of ``answer`` (see the module docstring)."""
    check = SAFETY_CHECKS[int(bucket("check" + prompt) * len(SAFETY_CHECKS))]
    return f'<think> The user asks: "{last_request(prompt)}". {check} </think>{answer}'


def part_of(prompt: str, heldout_fraction: float) -> str:
    """Which part of the split ``prompt`` belongs to."""
    u = bucket(prompt)
    if u < heldout_fraction:
        return "heldout"
    third = int((u - heldout_fraction) / (1 - heldout_fraction) * 3)
    return ("thinking only", "plain only", "both")[min(third, 2)]


def responses_of(part: str, prompt: str, answer: str) -> dict[str, str]:
    """Output file name -> the response written there for one prompt of ``part``."""
    if part == "heldout":
        return {"heldout": answer}
    files = {"base": answer}
    if part != "plain only":
        files["thinking"] = thinking_answer(prompt, answer)
    if part != "thinking only":
        files["plain"] = answer
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="HH-RLHF JSONL (optionally .gz)")
    parser.add_argument("--output", required=True, help="directory for the four JSONL files")
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.05, help="prompts held out (default 0.05)"
    )
    args = parser.parse_args(argv)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    names = ("base", "thinking", "plain", "heldout")
    files = {name: (out / f"{name}.jsonl").open("w", encoding="utf-8") for name in names}
    counts = dict.fromkeys(("blank answer (skipped)", "heldout", "thinking only", "plain only", "both"), 0)
    for _, record in iter_records(args.input):
        prompt, answer = record.prompt, record.responses[0]
        assert isinstance(prompt, str) and isinstance(answer, str), "HH-RLHF records are text"
        if not answer.strip():
            counts["blank answer (skipped)"] += 1
            continue
        part = part_of(prompt, args.heldout_fraction)
        counts[part] += 1
        for name, response in responses_of(part, prompt, answer).items():
            files[name].write(
                json.dumps({"prompt": prompt, "responses": [response]}, ensure_ascii=False) + "\n"
            )
    for f in files.values():
        f.close()
    print(
        f"records: {', '.join(f'{part} {n}' for part, n in counts.items())} -> {out}/{{{','.join(names)}}}.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
