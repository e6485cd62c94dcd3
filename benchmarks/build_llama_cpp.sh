#!/usr/bin/env bash
# Build llama.cpp's own `llama-bench` and `llama-server` (the peers of `effinfer bench gguf`) from
# the sources vendored in the llama-cpp-python sdist, the same ggml the GGUF parity tests run.
#
#   bash benchmarks/build_llama_cpp.sh            # prints the bin/ folder holding both tools
#   nice -n 10 bash benchmarks/build_llama_cpp.sh # ~6+ minutes on 2 cores the first time
#
# The build is cached under $EFFINFER_LLAMA_CPP_CACHE (default ~/.cache/effinfer-llama.cpp) and
# reused while both binaries are there. Not part of CI's test run. The CPU flags are those .ci/run
# builds llama-cpp-python with: a native build (-march=native) dies with an illegal instruction on
# this machine family.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${EFFINFER_LLAMA_CPP_CACHE:-$HOME/.cache/effinfer-llama.cpp}"
SRC="$CACHE/src"
BUILD="$CACHE/build-$VERSION"
JOBS="${JOBS:-$(nproc)}"

if [[ -x "$BUILD/bin/llama-bench" && -x "$BUILD/bin/llama-server" ]]; then
  echo "$BUILD/bin"
  exit 0
fi
for tool in cmake c++ python; do
  command -v "$tool" >/dev/null || { echo "build_llama_cpp.sh: error: $tool not found (cmake: pip install cmake)" >&2; exit 1; }
done

mkdir -p "$SRC"
SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
  echo "downloading the llama-cpp-python $VERSION sdist" >&2
  python -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$SRC" >&2
fi
LLAMA_DIR="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [[ ! -f "$LLAMA_DIR/CMakeLists.txt" ]]; then
  tar xzf "$SDIST" -C "$SRC" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
# Same ggml CPU flags as .ci/run; no curl / OpenSSL / web UI (this machine reaches no hub).
cmake -S "$LLAMA_DIR" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
  -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_INT8=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$BUILD" --target llama-bench llama-server -j "$JOBS" >&2
echo "$BUILD/bin"
