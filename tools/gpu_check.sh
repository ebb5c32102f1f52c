#!/usr/bin/env bash
# The one-call GPU check: on one H100/H200, in under 8 minutes, with what the machine has.
#
#   bash tools/gpu_check.sh [--out DIR] [--data DIR] [--budget S] [--plan-gpu NAME]
#   bash tools/gpu_check.sh --dry-run [--out DIR]    # the same pipeline on the CPU at toy scale (<1 min)
#   PYTHON=/path/to/python bash tools/gpu_check.sh   # choose the environment yourself
#
# Writes DIR/report.json and DIR/report.md (default DIR: gpu_check_out), logs in DIR/logs/.
# Nothing is installed and nothing is downloaded. The Python is $PYTHON, else the first of
# .venv/bin/python, python3, python whose torch sees CUDA (for --dry-run: has torch). The
# repo goes on PYTHONPATH, so megatron_prefpack need not be installed; megatron-core must be
# importable, or a copy of its source carried along (MCORE_SRC=<dir holding megatron/>, or a
# .venv*/lib/python3*/site-packages/megatron in the working tree); the report says which.
#
# Stages, each with its own time limit inside --budget (default 465 s; --dry-run 240 s); a
# stage that fails or times out is recorded and the rest still run:
#   data             SentencePiece tokenizer + `prefpack preprocess` of the bundled HH-RLHF pairs
#                    (or --data DIR, a dataset preprocessed elsewhere)
#   gpu_tests        pytest -m gpu: every GPU attention kernel against the reference in bf16
#   bench_attention  tools/bench_attention.py --json: prefix-shared vs duplicated vs causal at L=8192
#   bench_step       prefpack bench step --json: the 1.4 B MoE (bench-moe-1b, bf16), pairs/s and
#                    peak GPU memory per row layout
#   train            20 DPO steps of the same model (tools/gpu_check/dpo.yaml): step time, peak
#                    memory, held-out DPO loss and reward accuracy before/after (must improve)
#   plan             prefpack plan for that config: predicted vs measured peak memory
#                    ("planner unavailable" where this checkout has no `prefpack plan`)
# Exit status: 1 when a stage failed or timed out; else 2 when the environment lacks torch, CUDA
# or megatron-core (the report says which); else 0.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

dry_run=0
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry_run=1; fi
done

# A Python whose torch sees CUDA (any torch for --dry-run); else the first with torch, so the
# report can say what is missing; else python3, to write the report at all.
need='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)'
if [ "$dry_run" = 1 ]; then need='import torch'; fi
python="${PYTHON:-}"
if [ -z "$python" ]; then
  fallback=""
  for candidate in "$repo/.venv/bin/python" python3 python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c "$need" >/dev/null 2>&1; then
      python="$candidate"
      break
    fi
    if [ -z "$fallback" ] && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      fallback="$candidate"
    fi
  done
  python="${python:-${fallback:-python3}}"
fi
python="$(command -v "$python")"
echo "[gpu_check] PYTHON=$python" >&2
exec "$python" "$repo/tools/gpu_check/run.py" --python "$python" "$@"
