#!/usr/bin/env bash
# Think-Fusion (A.X K1's recipe, arXiv 2601.09200) at demo scale on CPU, on bundled HH-RLHF data.
#
#   bash examples/think_fusion_cpu.sh          the whole recipe (about 5 minutes on 2 cores)
#   BASE_STEPS=2 PARENT_STEPS=2 FUSION_STEPS=2 PROMPTS=4 bash examples/think_fusion_cpu.sh
#                                              the same steps at CI scale (about 2 minutes; numbers meaningless)
#
# The recipe: (1) SFT a thinking and a non-thinking model from a common base, (2) merge them
# linearly, theta = 0.8 theta_think + 0.2 theta_plain (prefpack merge), (3) SFT the merged model
# on a mode-overlap set: the same prompt answered once with <think>...</think> reasoning and
# once without. An overlap sample is one prompt with two responses, so preference packing
# computes the prompt once for both. The prompt is shared, so the mode is requested by a marker
# token opening each response: "/think<think> ... </think> answer" and "/no_think answer"; at
# inference the marker is prefilled after the prompt.
#
# Steps: make a thinking set and a plain set from HH-RLHF (examples/think_fusion/make_sets.py:
# the plain answer is the chosen response, the thinking answer the same response behind a
# TEMPLATED reasoning block, restating the request plus a fixed safety check; overlapping and
# one-sided prompt subsets, and held-out prompts), train a 2,000-piece tokenizer with the four
# special pieces, join the sets (prefpack mode-overlap, which also writes each parent's
# marker-prefixed set), preprocess, SFT the common base, the thinking and the plain parent
# from it, merge, SFT the merged model on the overlap set (objective.sft.response_weights
# [1, 1]), export the four models to Hugging Face directories and ask each, with transformers,
# for both modes on held-out prompts (examples/think_fusion/check_modes.py): a table of mode
# accuracy per model and requested mode, and whether the fused model beats both parents.
#
# Knobs: OUT (default think_fusion_out), BASE_STEPS (40), PARENT_STEPS (60), FUSION_STEPS (40),
# PROMPTS (held-out prompts asked, 64), MAX_NEW_TOKENS (16), PREFPACK_PYTHON (an existing
# environment's python instead of .venv).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-think_fusion_out}"
base_steps="${BASE_STEPS:-40}"
parent_steps="${PARENT_STEPS:-60}"
fusion_steps="${FUSION_STEPS:-40}"
prompts="${PROMPTS:-64}"
max_new_tokens="${MAX_NEW_TOKENS:-16}"
source "$repo/examples/python_env.sh"
start=$SECONDS

here="$repo/examples/think_fusion"
configs="$here/configs"
hh="$repo/examples/data/hh-rlhf-harmless-base-test.jsonl.gz"
lengths=(--max-prompt-len 64 --max-response-len 80 --seq-len 256)

echo "== 1/10 a thinking set, a plain set and held-out prompts from HH-RLHF (reasoning is templated)"
mkdir -p "$out"
(cd "$out" && rm -rf sets single data base think plain merged fused hf modes.json modes.txt export_*.log)
"$python" "$here/make_sets.py" --input "$hh" --output "$out/sets"

echo "== 2/10 tokenizer: 2000 pieces, /think /no_think <think> </think> always one piece each"
"$bin/prefpack" train-tokenizer --input "$hh" --output "$out/tokenizer" --vocab-size 2000 \
  --user-defined-symbols /think /no_think '<think>' '</think>'

echo "== 3/10 mode-overlap set: join by prompt; each parent's marker-prefixed set beside it"
"$bin/prefpack" mode-overlap --thinking "$out/sets/thinking.jsonl" --plain "$out/sets/plain.jsonl" \
  --output "$out/sets/overlap.jsonl" --emit-single "$out/single" --tokenizer "$out/tokenizer.model"

echo "== 4/10 preprocess (prompts cut to their last 64 tokens, responses to 80)"
for set in base:sets/base heldout:sets/heldout thinking:single/thinking plain:single/plain overlap:sets/overlap; do
  echo "-- ${set%%:*}"
  "$bin/prefpack" preprocess --input "$out/${set#*:}.jsonl" --tokenizer "$out/tokenizer.model" \
    --output "$out/data/${set%%:*}" "${lengths[@]}" --workers 1 --no-progress | sed -n '/^  groups written/p'
done

train() {  # train NAME CONFIG STEPS DATA [KEY=VALUE ...]: one stage into $out/NAME
  local name="$1" config="$2" steps="$3" data="$4"
  shift 4
  "$bin/prefpack" train --config "$configs/$config" run.tensorboard=false run.train_steps="$steps" \
    data.path="$out/data/$data" run.dir="$out/$name" checkpoint.save="$out/$name/checkpoints" "$@"
}

echo "== 5/10 common base: SFT on every training prompt's chosen answer ($base_steps steps)"
train base base_sft.yaml "$base_steps" base

echo "== 6/10 thinking parent: SFT from the base on '/think<think>...</think> answer' ($parent_steps steps)"
train think parent_sft.yaml "$parent_steps" thinking checkpoint.load="$out/base/checkpoints"

echo "== 7/10 plain parent: SFT from the base on '/no_think answer' ($parent_steps steps)"
train plain parent_sft.yaml "$parent_steps" plain checkpoint.load="$out/base/checkpoints"

echo "== 8/10 merge: 0.8 thinking + 0.2 plain"
"$bin/prefpack" merge --input "$out/think/checkpoints" --input "$out/plain/checkpoints" \
  --weights 0.8 0.2 --output "$out/merged"

echo "== 9/10 fused: mode-overlap SFT of the merged model, response weights [1, 1] ($fusion_steps steps)"
train fused fusion_sft.yaml "$fusion_steps" overlap checkpoint.load="$out/merged"

echo "== 10/10 export the four models to Hugging Face format; ask each for both modes (transformers)"
models=()
for name in think plain merged fused; do
  load="$out/$name/checkpoints"
  [ "$name" = merged ] && load="$out/merged"
  "$python" "$repo/tools/export_hf_checkpoint.py" --load "$load" --output "$out/hf/$name" \
    --dtype float32 --overwrite > "$out/export_$name.log"
  models+=(--model "$name=$out/hf/$name")
done
"$python" "$here/check_modes.py" --data "$out/data/heldout" --tokenizer "$out/tokenizer.model" \
  "${models[@]}" --prompts "$prompts" --max-new-tokens "$max_new_tokens" --json "$out/modes.json" \
  | tee "$out/modes.txt"

"$python" - "$out" "$((SECONDS - start))" <<'PY'
import json, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])


def records(name):
    return [json.loads(line) for line in (out / name / "metrics.jsonl").open()]


def first_last(values):
    k = max(1, min(10, len(values) // 2))
    return sum(values[:k]) / k, sum(values[-k:]) / k


print()
print("== training (train loss: mean of the first and last steps, up to 10 each)")
for name in ("base", "think", "plain", "fused"):
    train = [r for r in records(name) if r["split"] == "train"]
    a, b = first_last([r["loss"] for r in train])
    line = f"  {name:<6} {len(train):>4} steps  loss {a:.3f} -> {b:.3f}"
    if name == "fused":
        for k, mode in enumerate(("thinking", "plain")):
            a, b = first_last([r[f"loss/response_{k}"] for r in train])
            line += f"; {mode} responses {a:.3f} -> {b:.3f}"
    print(line)
evals = [r for r in records("fused") if r["split"] == "eval"]
if evals:
    before, after = evals[0], evals[-1]
    print(f"  fused, held-out overlap groups ({int(after['count'])} response tokens): loss {before['loss']:.3f} -> "
          f"{after['loss']:.3f}; thinking {before['loss/response_0']:.3f} -> {after['loss/response_0']:.3f}, "
          f"plain {before['loss/response_1']:.3f} -> {after['loss/response_1']:.3f}")
merge = json.loads((out / "merged" / "merge.json").read_text())
print("merged: " + " + ".join(f"{i['weight']} x {Path(i['path']).parent.parent.name} (step {i['step']})"
                              for i in merge["inputs"]))
print(f"total time {seconds // 60} min {seconds % 60} s")
PY
