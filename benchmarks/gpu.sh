#!/usr/bin/env bash
# The GPU path in one go (about 10 minutes on one H100/H200): the device tests on CUDA, then `melora bench`
# on random-initialised models of real shapes, bf16 base (Llama-2-7B's 4096x4096, 4096x11008 and
# 11008x4096 layers; SmolLM2-135M end to end), eager and torch.compile, and the dense/bmm crossover of the
# adapter path. Writes JSON + markdown + a plot per experiment to benchmarks/results/gpu/ (override with
# MELORA_GPU_OUT), and a log of everything to <out>/gpu.log.
#
#   bash benchmarks/gpu.sh             # on CUDA when torch sees a GPU; otherwise a CPU dry run
#   bash benchmarks/gpu.sh --dry-run   # the CPU dry run anywhere: same steps, toy sizes (--quick), < 5 min
#
# PYTHON selects the interpreter (default .venv/bin/python, else python3); it needs melora installed, or
# the repository's src/ on PYTHONPATH, and a CUDA build of torch for the real run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${MELORA_GPU_OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1

device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
bench_flags=(--output-dir "$OUT" --figures-dir "$OUT")
if [ "${1:-}" = "--dry-run" ] || [ "$device" = cpu ]; then
  device=cpu
  # float32: bf16 matmuls are emulated (slow) on most CPUs; tests/test_device.py covers bf16 on the CPU
  bench_flags+=(--quick --device cpu --dtype float32 --no-memory)
  echo "melora gpu.sh: CPU dry run (toy sizes, float32; no GPU numbers)"
else
  "$PY" -c "import torch; print('melora gpu.sh on', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
fi
start=$SECONDS

if [ "${MELORA_GPU_TESTS:-1}" = 1 ]; then  # MELORA_GPU_TESTS=0: bench only (the suite runs these anyway)
  echo "== device tests on $device"
  MELORA_TEST_DEVICE=$device "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py
fi

for experiment in layer e2e compile kernels; do
  echo "== melora bench benchmarks/gpu/$experiment.yaml ($((SECONDS - start)) s so far)"
  "$PY" -m melora.cli bench "benchmarks/gpu/$experiment.yaml" "${bench_flags[@]}"
done
echo "melora gpu.sh: done in $((SECONDS - start)) s; results in $OUT"
