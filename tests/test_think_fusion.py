"""``examples/think_fusion_cpu.sh`` at CI scale (2 steps a stage, 4 held-out prompts).

The run must complete and leave what each step promises: the mode-overlap set with the join
counts it printed, each parent's marker-prefixed set, the merged checkpoint (``merge.json``:
0.8 thinking + 0.2 plain), the fused run's per-mode losses, and a mode table whose every
number follows from the per-prompt results in ``modes.json`` (each answer's mode recomputed
here from its generated token ids, the tag and marker ids read from the tokenizer directly).
Whether the fused model wins is not asserted: at 2 steps a stage the numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = ("think", "plain", "merged", "fused")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("think_fusion") / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PREFPACK_PYTHON": sys.executable,
        "BASE_STEPS": "2",
        "PARENT_STEPS": "2",
        "FUSION_STEPS": "2",
        "PROMPTS": "4",
        "MAX_NEW_TOKENS": "8",
    }
    done = subprocess.run(
        ["bash", str(REPO / "examples" / "think_fusion_cpu.sh")],
        env=env,
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sets_and_join_counts(run: tuple[Path, str]) -> None:
    out, stdout = run
    overlap = lines(out / "sets" / "overlap.jsonl")
    matched = int(re.search(r"matched prompts\s+(\d+)", stdout).group(1))
    assert matched == len(overlap) > 0
    for record in overlap:
        thinking, plain = record["responses"]
        assert thinking.startswith("/think<think>") and plain.startswith("/no_think")
    for mode, marker in (("thinking", "/think<think>"), ("plain", "/no_think")):
        single = lines(out / "single" / f"{mode}.jsonl")
        records = int(re.search(rf"{mode} set\s+(\d+)\s+records", stdout).group(1))
        assert len(single) == records == len(lines(out / "sets" / f"{mode}.jsonl"))
        assert all(r["responses"][0].startswith(marker) for r in single)
    # the held-out prompts are in no training set
    heldout = {r["prompt"] for r in lines(out / "sets" / "heldout.jsonl")}
    trained = {
        r["prompt"] for name in ("base", "thinking", "plain") for r in lines(out / "sets" / f"{name}.jsonl")
    }
    assert heldout and not heldout & trained


def test_merged_checkpoint_and_fused_losses(run: tuple[Path, str]) -> None:
    out, _ = run
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert [(Path(i["path"]).parent.parent.name, i["weight"]) for i in merge["inputs"]] == [
        ("think", 0.8),
        ("plain", 0.2),
    ]
    train = [r for r in lines(out / "fused" / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) == 2 and all({"loss/response_0", "loss/response_1"} <= r.keys() for r in train)
    for name in MODELS:
        assert (out / "hf" / name / "config.json").exists()


def test_mode_table_follows_from_the_per_prompt_results(run: tuple[Path, str]) -> None:
    import sentencepiece

    out, stdout = run
    report = json.loads((out / "modes.json").read_text())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    tags = {sp.PieceToId("<think>"), sp.PieceToId("</think>")}
    markers = {sp.PieceToId("/think"), sp.PieceToId("/no_think")}
    assert report["prompts"] == 4 and list(report["models"]) == list(MODELS)
    printed = {
        m.group(1): tuple(float(v) / 100 for v in m.group(2, 3, 4))
        for m in re.finditer(r"^  (\w+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%", stdout, re.M)
    }
    for name, entry in report["models"].items():
        results = entry["results"]
        assert len(results) == 2 * 4 and all(len(r["generated"]) <= 8 for r in results)
        right = {"thinking": [], "plain": []}
        for r in results:
            # thinking: a think tag comes before any mode marker the model writes
            first = next((t for t in r["generated"] if t in tags | markers), None)
            assert r["thinking"] == (first in tags)
            right[r["mode"]].append(r["thinking"] == (r["mode"] == "thinking"))
        expected = {mode: sum(v) / len(v) for mode, v in right.items()}
        expected["overall"] = sum(right["thinking"] + right["plain"]) / len(results)
        assert entry["accuracy"] == pytest.approx(expected)
        assert printed[name] == pytest.approx(
            (expected["thinking"], expected["plain"], expected["overall"]), abs=5e-4
        )
    fused = report["models"]["fused"]["accuracy"]["overall"]
    beats = all(fused > report["models"][p]["accuracy"]["overall"] for p in ("think", "plain"))
    assert report["fused_beats_both_parents"] == beats
    assert f"the fused model {'beats' if beats else 'does not beat'} both parents" in stdout
