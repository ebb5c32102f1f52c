#!/usr/bin/env bash
# Create (or reuse) a virtual environment with megatron-prefpack installed for CPU work.
#
#   bash tools/setup_env.sh [VENV_DIR]        default VENV_DIR: .venv
#   MCORE=0.19.2 bash tools/setup_env.sh .venv-mcore019
#
# torch==2.13.0 is installed first: on these machines it is a local CPU wheel, while any other
# torch spec downloads GBs of CUDA packages. MCORE picks the megatron-core release:
#   unset   -> whatever pip resolves (0.16.1 on Python 3.11, 0.19.x on Python 3.12)
#   0.19.x  on Python 3.11 -> installed with --ignore-requires-python (+ triton, numpy<2.5)
# Test-only: peft (tests/test_lora_peft.py loads exported LoRA adapters with it), pinned to a release
# that works with transformers 5.24, installed with torch pinned on the same line.
# Prints the path of the environment's python on its last line.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv}"
python="${PYTHON:-python3}"
PEFT=0.21.2

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp="$venv/.prefpack-setup-${MCORE:-default}-$(cat "$repo/pyproject.toml" "${BASH_SOURCE[0]}" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "[setup] $venv is up to date" >&2
  echo "$venv/bin/python"
  exit 0
fi

echo "[setup] installing torch==2.13.0 (CPU)" >&2
"${pip[@]}" install "torch==2.13.0" >&2
"$venv/bin/python" -c "import torch" >/dev/null

py_minor="$("$venv/bin/python" -c 'import sys; print(sys.version_info.minor)')"
pins=("torch==2.13.0")
if [ -n "${MCORE:-}" ]; then
  pins+=("megatron-core==$MCORE")
  if [ "$py_minor" -lt 12 ]; then
    # megatron-core >= 0.17 declares Python >= 3.12 but runs on 3.11 (it needs triton there).
    # Only megatron-core itself skips the Python check (installed alone, without dependencies):
    # --ignore-requires-python on the full install would let pip pick other packages' 3.12-only
    # releases (contourpy 1.4 as an sdist that fails to build). numpy 2.5 really needs 3.12.
    echo "[setup] installing megatron-core==$MCORE alone (--ignore-requires-python)" >&2
    "${pip[@]}" install --no-deps --ignore-requires-python "megatron-core==$MCORE" >&2
    pins+=("numpy<2.5" triton)
  fi
fi
echo "[setup] installing megatron-prefpack[dev] with ${pins[*]}" >&2
"${pip[@]}" install -e "$repo[dev]" "${pins[@]}" >&2
echo "[setup] installing peft==$PEFT (test-only) with torch==2.13.0" >&2
"${pip[@]}" install "peft==$PEFT" "torch==2.13.0" >&2
"$venv/bin/python" - <<'PY' >&2
import megatron.core, peft, torch, megatron_prefpack
print(f"[setup] torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"peft {peft.__version__}, megatron-prefpack {megatron_prefpack.__version__}")
PY
touch "$stamp"
echo "$venv/bin/python"
