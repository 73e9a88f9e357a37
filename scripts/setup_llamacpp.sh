#!/usr/bin/env bash
# Create .venv-llamacpp (once) for the llama.cpp interop test (tests/test_interop_llamacpp.py, pytest -m llamacpp):
# llama-cpp-python built from source (CPU only, no llava/mtmd, no tools), plus llama.cpp's own converters
# convert_hf_to_gguf.py and convert_lora_to_gguf.py, with the gguf-py package and the `conversion` package they
# import, all taken from the same llama-cpp-python source distribution, so converter and runtime are one
# llama.cpp revision. The converters need torch (installed first, pinned, CPU build), transformers (llama.cpp's
# own pin), numpy, sentencepiece and safetensors: a separate environment, since they would fight melora's
# .venv over transformers (melora needs >= 5, llama.cpp's converters pin 4.57.6). The test runs in .venv and
# calls this environment in subprocesses; nothing here imports melora.
#
# Measured on 2 idle CPU cores, from nothing: 2 min 38 s wall (3 min 56 s CPU), most of it compiling llama.cpp
# (75 objects); 1.2 GB on disk (torch is 750 MB of it). The test itself then takes about 80 s. Idempotent: re-running only checks the marker file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${MELORA_LLAMACPP_VENV:-.venv-llamacpp}"
VERSION="${MELORA_LLAMACPP_VERSION:-0.3.36}"   # llama-cpp-python; its vendor/llama.cpp is the converters' source
MARKER="$VENV/.melora-llamacpp-$VERSION"
if [ -f "$MARKER" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned (CPU build; on a CPU-only machine set MELORA_TORCH_INDEX_URL as for setup.sh), so that
# nothing below pulls a CUDA torch.
$PIP install -q ${MELORA_TORCH_INDEX_URL:+--index-url "$MELORA_TORCH_INDEX_URL"} "torch==2.13.0"
# The converters' requirements (vendor/llama.cpp/requirements/requirements-convert_*.txt, torch aside).
$PIP install -q "numpy>=2.2.6,<3" "sentencepiece>=0.1.98,<0.3" "transformers==4.57.6" "safetensors>=0.4" \
  "protobuf>=4.21,<5" tqdm pyyaml requests

# The source distribution: what pip builds below and where the converters come from.
mkdir -p "$VENV/src"
SDIST="$VENV/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  $PIP download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$VENV/src"
fi
SRC="$VENV/src/llama_cpp_python-$VERSION"
rm -rf "$SRC" "$VENV/llama.cpp"
tar -xzf "$SDIST" -C "$VENV/src"
mkdir -p "$VENV/llama.cpp"
for f in convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py LICENSE; do
  cp -r "$SRC/vendor/llama.cpp/$f" "$VENV/llama.cpp/"
done
# The vendored gguf-py, the one the converters were written against (not PyPI's gguf).
$PIP install -q "$VENV/llama.cpp/gguf-py"

# llama.cpp itself: CPU backend only; no llava/mtmd library (llama_cpp imports it lazily, for images only), no
# tests, examples, tools or server. llama-cpp-python's CMakeLists forces llama.cpp's `common` helper library on,
# though the Python package only loads libllama (and the ggml libraries): turning it off here halves the build
# (75 objects instead of 127).
sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)/set(LLAMA_BUILD_COMMON OFF CACHE BOOL "Build llama.cpp common library" FORCE)/' \
  "$SRC/CMakeLists.txt"
grep -q 'set(LLAMA_BUILD_COMMON OFF' "$SRC/CMakeLists.txt"
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF ${CMAKE_ARGS:-}" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  $PIP install -q "$SRC"
rm -rf "$SRC" "$SDIST"  # built and copied out: 250 MB no longer needed (a re-run downloads it again)

"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ("llama_cpp_python", "gguf", "torch", "transformers")))
EOF
"$VENV/bin/python" "$VENV/llama.cpp/convert_lora_to_gguf.py" --help > /dev/null
touch "$MARKER"
