#!/usr/bin/env bash
# The CPU demo: preference-packed SFT -> DPO of a small MoE on bundled HH-RLHF data, no GPU.
#
#   bash examples/demo_cpu.sh                 one process (about 5 minutes on 2 cores)
#   NPROC=2 bash examples/demo_cpu.sh         two gloo processes via torchrun, expert parallel 2
#   LORA=1 bash examples/demo_cpu.sh          DPO trains LoRA adapters (rank 8, attention + MLPs) on
#                                             the frozen SFT model, whose own forward with the
#                                             adapters off is the reference (reference.mode base);
#                                             the adapters are merged (prefpack merge-lora) before
#                                             the export
#
# Steps: set up .venv if needed (tools/setup_env.sh: torch 2.13.0 CPU, then `pip install -e .[dev]`),
# train a 2000-piece SentencePiece tokenizer, preprocess the data into prompt groups, SFT the
# model on the chosen responses, store the SFT model's reference log-probs, train DPO from it,
# export the DPO model to a Hugging Face directory and check with transformers that it gives the
# packed run's held-out log-probs (and let it write a reply), and print held-out reward accuracy
# before/after DPO and the packing savings.
# Everything goes to $OUT (default: demo_out/ in the current directory). PREFPACK_PYTHON picks
# an existing environment's python instead of .venv.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-demo_out}"
nproc="${NPROC:-1}"
lora="${LORA:-0}"
source "$repo/examples/python_env.sh"
start=$SECONDS

configs="$repo/examples/configs"
data="$repo/examples/data/hh-rlhf-harmless-base-test.jsonl.gz"
common=(data.path="$out/data" run.tensorboard=false)
if [ "$nproc" -gt 1 ]; then
  launch=("$bin/torchrun" --standalone --nproc-per-node "$nproc" "$bin/prefpack")
  common+=(parallel.expert="$nproc")
else
  launch=("$bin/prefpack")
fi

# DPO stage: full fine-tuning against the stored reference table, or (LORA=1) adapters only,
# the reference being the same model with its adapters off, at a higher learning rate.
dpo=(reference.path="$out/data/ref_logprobs.npy")
final="$out/dpo/checkpoints"  # the model the export and the check read
if [ "$lora" = 1 ]; then
  dpo=(reference.mode=base reference.path=null model.lora.rank=8 model.lora.alpha=16
    "model.lora.target_modules=[linear_q_down_proj,linear_q_up_proj,linear_kv_down_proj,linear_kv_up_proj,linear_proj,linear_fc1,linear_fc2]"
    optimizer.lr=2.0e-3 optimizer.min_lr=2.0e-4)
  final="$out/dpo_merged"
fi

echo "== 1/8 tokenizer"
mkdir -p "$out"
"$bin/prefpack" train-tokenizer --input "$data" --output "$out/tokenizer" --vocab-size 2000

echo "== 2/8 preprocess (prompts cut to their last 96 tokens, responses to 64)"
"$bin/prefpack" preprocess --input "$data" --tokenizer "$out/tokenizer.model" --output "$out/data" \
  --max-prompt-len 96 --max-response-len 64 --seq-len 256 --workers 2 --no-progress

echo "== 3/8 SFT warm-up on the chosen responses"
rm -rf "$out/sft"
"${launch[@]}" train --config "$configs/demo_sft.yaml" "${common[@]}" \
  run.dir="$out/sft" checkpoint.save="$out/sft/checkpoints"

if [ "$lora" = 1 ]; then
  echo "== 4/8 reference log-probs: none to store (LoRA: the SFT model is the adapters-off forward)"
else
  echo "== 4/8 reference log-probs of the SFT model"
  "${launch[@]}" ref-logprobs --config "$configs/demo_dpo.yaml" "${common[@]}" \
    checkpoint.load="$out/sft/checkpoints" --output "$out/data/ref_logprobs.npy"
fi

echo "== 5/8 DPO (reference = the SFT model$([ "$lora" = 1 ] && echo '; LoRA adapters on the frozen SFT model'))"
rm -rf "$out/dpo"
"${launch[@]}" train --config "$configs/demo_dpo.yaml" "${common[@]}" "${dpo[@]}" \
  run.dir="$out/dpo" checkpoint.load="$out/sft/checkpoints" checkpoint.save="$out/dpo/checkpoints"

if [ "$lora" = 1 ]; then
  echo "== 6/8 merge the adapters into the SFT weights, export to Hugging Face format (AXK1ForCausalLM)"
  rm -rf "$final"
  "${launch[@]}" merge-lora --config "$configs/demo_dpo.yaml" "${common[@]}" "${dpo[@]}" \
    checkpoint.load="$out/sft/checkpoints" --load "$out/dpo/checkpoints" --output "$final"
else
  echo "== 6/8 export the DPO model to Hugging Face format (an AXK1ForCausalLM directory)"
fi
"$python" "$repo/tools/export_hf_checkpoint.py" --load "$final" --output "$out/hf" \
  --dtype float32 --overwrite

echo "== 7/8 transformers loads it: the packed run's held-out log-probs, and a reply"
"${launch[@]}" ref-logprobs --config "$configs/demo_dpo.yaml" "${common[@]}" \
  checkpoint.load="$final" --output "$out/dpo_logprobs.npy"
"$python" "$repo/examples/check_hf_export.py" --hf-dir "$out/hf" --data "$out/data" \
  --table "$out/dpo_logprobs.npy" --tokenizer "$out/tokenizer.model"

echo "== 8/8 packing savings on the same data"
"$bin/prefpack" bench packing --data "$data" --tokenizer "$out/tokenizer.model" --seq-len 256 \
  --max-prompt-len 96 --max-response-len 64 --json > "$out/bench.json"

"$python" - "$out" "$((SECONDS - start))" <<'PY'
import json, sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
records = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").open()]
evals = [r for r in records if r["split"] == "eval"]
train = [r for r in records if r["split"] == "train"]
before, after = evals[0], evals[-1]
print()
print("== result")
print(f"held-out reward accuracy ({int(after['count'])} pairs never trained on):")
print(f"  before DPO  {before['rewards/accuracies']:.1%}: the policy is the reference, so both implicit rewards "
      f"are 0 and pairs tie (mean margin {before['rewards/margins']:+.1e}, float rounding); a tie counts as wrong")
print(f"  after DPO   {after['rewards/accuracies']:.1%} (margin {after['rewards/margins']:+.3f})")
print(f"held-out DPO loss {before['loss']:.4f} -> {after['loss']:.4f}; train loss (mean of the first and "
      f"last 10 steps) {sum(r['loss'] for r in train[:10]) / 10:.4f} -> {sum(r['loss'] for r in train[-10:]) / 10:.4f}")
bench = json.loads((out / "bench.json").read_text())
layouts = bench["layouts"]
print(f"packing the same data in rows of {bench['seq_len']} tokens ({bench['groups']} groups that fit every layout):")
print(f"  {'layout':<16}{'rows':>7}{'tokens/group':>14}{'padding':>9}{'attention pairs':>17}")
for name in ("prefpack", "duplicated", "unpacked", "unpacked_sorted"):
    lay = layouts[name]
    print(f"  {name:<16}{lay['rows']:>7}{lay['tokens_per_group']:>14.1f}{lay['padding_fraction']:>9.1%}"
          f"{lay['attention_pairs_per_group']:>17.0f}")
pp, dup, unp = layouts["prefpack"], layouts["duplicated"], layouts["unpacked"]
print(f"  prefpack computes {1 - pp['tokens_per_group'] / dup['tokens_per_group']:.0%} fewer tokens than the "
      f"duplicated-prompt packing and {1 - pp['tokens_per_group'] / unp['tokens_per_group']:.0%} fewer than unpacked rows")
print(f"total time {seconds // 60} min {seconds % 60} s")
PY
