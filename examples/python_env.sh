# Sourced by the example scripts (after they set $repo): the environment to run in.
# PREFPACK_PYTHON picks an existing environment's python; otherwise tools/setup_env.sh sets up
# (or reuses) .venv. Sets $python and $bin (its bin directory, where `prefpack` and `torchrun` are).
python="${PREFPACK_PYTHON:-}"
if [ -z "$python" ]; then
  python="$(bash "$repo/tools/setup_env.sh" | tail -n 1)"
fi
bin="$(dirname "$python")"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"  # Megatron warns at length about missing TE/apex on CPU
