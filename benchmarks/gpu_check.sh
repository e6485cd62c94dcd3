#!/usr/bin/env bash
# The GPU check, in one call: CUDA tests of the quantized kernels and the engine, then the
# quantized-matmul benchmark and the end-to-end decode benchmark (effinfer per scheme vs HF). The GPU machine has no network and its own python3 (torch, triton,
# pytest, transformers); effinfer's one missing dependency (gguf, pure Python) and the
# stories260K test model travel in build/ (git-ignored), which the call must carry.
#
#   Here, once:        bash benchmarks/gpu_check.sh --prepare
#   On the GPU (run):  command "bash benchmarks/gpu_check.sh", carry ["build/gpu-wheels", "build/shared-data"]
#
# Writes under $OUT: env.txt, pytest.log, bench.log, gpu_quant.{json,md}, decode.log, gpu_decode.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    PIP="${PIP:-/work/venv/bin/pip}"
    mkdir -p build/gpu-wheels build/shared-data
    "$PIP" download -q --no-deps --only-binary=:all: gguf==0.19.0 -d build/gpu-wheels
    data="${EFFINFER_SHARED_DATA:-../shared/data}"
    mkdir -p build/shared-data/stories260K
    cp -r "$data/stories260K/hf" build/shared-data/stories260K/
    du -sh build/gpu-wheels build/shared-data
    exit 0
fi

OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/triton-cache
if compgen -G "build/gpu-wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        build/gpu-wheels/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ -d build/shared-data ]] && export EFFINFER_SHARED_DATA="$PWD/build/shared-data"

{
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    python3 -c "import effinfer; print('effinfer imports')"
} 2>&1 | tee "$OUT/env.txt"

# Tests: ~1-3 minutes, mostly Triton compiles (8 workers share the compile cache).
workers=""
python3 -c "import xdist" 2>/dev/null && workers="-n 8"
timeout 240 python3 -m pytest -q -rfEs --tb=short -p no:cacheprovider $workers \
    tests/test_gpu_quant.py tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}

# Benchmark: ~1 minute.
timeout 150 python3 benchmarks/gpu_quant.py --out "$OUT/gpu_quant.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

# End to end: ~1-2 minutes (a 1.1B random model is written, loaded six times).
timeout 200 python3 benchmarks/gpu_decode.py --rounds 2 --out "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/decode.log"
decode_rc=${PIPESTATUS[0]}

tail -n 4 "$OUT/pytest.log"
echo "pytest rc=$tests_rc  benchmark rc=$bench_rc  decode rc=$decode_rc  (124 = timed out)"
exit $(( tests_rc != 0 || bench_rc != 0 || decode_rc != 0 ))
