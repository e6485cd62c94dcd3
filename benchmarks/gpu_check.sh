#!/usr/bin/env bash
# The GPU check, in one call of at most 10 minutes (docs/gpu-decoding.md):
#   1. the GPU tests: the fused Triton operators and CUDA graphs (test_triton_ops.py, test_cuda_graphs.py),
#      the engine on CUDA (test_gpu.py), the quantized kernels (test_gpu_quant.py);
#   2. decode at the roofline (benchmarks/gpu_decode.py): batch-1 decode of a Qwen2.5-1.5B-shaped bf16
#      random model as a fraction of HBM bandwidth, CUDA graphs on / off, Triton ops on / off, and
#      throughput against HF transformers at batch 1, 16 and 64;
#   3. the quantized-matmul benchmark (benchmarks/gpu_quant.py).
# Each step runs under its own `timeout`, within an overall budget (GPU_CHECK_TOTAL_S, default 560 s),
# and summary.{json,md} under $OUT are rewritten after every step, so a step that fails or times out
# leaves the others' results. The GPU machine has no network and its own python3 (torch, triton, pytest,
# transformers); effinfer's one missing dependency (gguf, pure Python) and the stories260K test model
# travel in build/ (git-ignored), which the call must carry.
#
#   Here, once:        bash benchmarks/gpu_check.sh --prepare
#   On the GPU (run):  command "bash benchmarks/gpu_check.sh", carry ["build/gpu-wheels", "build/shared-data"]
#
# Writes under $OUT: env.txt, pytest.log, decode.log, gpu_decode.{json,md}, bench.log, gpu_quant.{json,md},
# summary.{json,md}. Overrides (for a smoke test of this script without a GPU): GPU_CHECK_TESTS,
# GPU_CHECK_DECODE_ARGS, GPU_CHECK_QUANT_ARGS, GPU_CHECK_{TESTS,DECODE,QUANT}_S, GPU_CHECK_TOTAL_S.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    PIP="${PIP:-pip}"
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
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-cache}"
PYTHON="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-560}"
TESTS="${GPU_CHECK_TESTS:-tests/test_triton_ops.py tests/test_cuda_graphs.py tests/test_gpu.py tests/test_gpu_quant.py}"
DECODE_ARGS="${GPU_CHECK_DECODE_ARGS:---rounds 2}"
QUANT_ARGS="${GPU_CHECK_QUANT_ARGS:-}"

if compgen -G "build/gpu-wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        build/gpu-wheels/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ -d build/shared-data ]] && export EFFINFER_SHARED_DATA="$PWD/build/shared-data"

{
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv \
        || echo "no nvidia-smi"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" || echo "no triton"
    "$PYTHON" -c "import effinfer; print('effinfer imports')"
} 2>&1 | tee "$OUT/env.txt"

declare -a STEP_NAMES=() STEP_RCS=() STEP_SECONDS=()

write_summary() {
    local json="{\"device\": \"$(head -n 2 "$OUT/env.txt" | tail -n 1 | tr -d '"\\')\", \"steps\": {"
    local md="# GPU check\n\n| step | exit status | seconds |\n| --- | ---: | ---: |\n"
    local i sep=""
    for i in "${!STEP_NAMES[@]}"; do
        json+="$sep\"${STEP_NAMES[$i]}\": {\"rc\": ${STEP_RCS[$i]}, \"seconds\": ${STEP_SECONDS[$i]}}"
        md+="| ${STEP_NAMES[$i]} | ${STEP_RCS[$i]} | ${STEP_SECONDS[$i]} |\n"
        sep=", "
    done
    json+="}}"
    printf '%s\n' "$json" >"$OUT/summary.json"
    {
        printf '%b' "$md"
        printf '\n(exit status 124: timed out; -1: skipped, no time left)\n'
        [[ -f "$OUT/pytest.log" ]] && printf '\n## tests\n\n```\n%s\n```\n' "$(tail -n 3 "$OUT/pytest.log")"
        [[ -f "$OUT/gpu_decode.md" ]] && printf '\n## decode\n\n%s\n' "$(cat "$OUT/gpu_decode.md")"
        [[ -f "$OUT/gpu_quant.md" ]] && printf '\n## quantized matmuls\n\n%s\n' "$(cat "$OUT/gpu_quant.md")"
    } >"$OUT/summary.md"
}

# run_step NAME CAP_SECONDS LOG COMMAND...: COMMAND under `timeout`, capped by what is left of TOTAL_S.
run_step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((TOTAL_S - SECONDS - 5))
    local limit=$((cap < left ? cap : left))
    local start=$SECONDS rc
    if ((limit < 15)); then
        echo "== $name: skipped, ${left}s left of ${TOTAL_S}s" | tee "$OUT/$log"
        rc=-1
    else
        echo "== $name (at most ${limit}s): $*" | tee "$OUT/$log"
        timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
        rc=${PIPESTATUS[0]}
    fi
    STEP_NAMES+=("$name")
    STEP_RCS+=("$rc")
    STEP_SECONDS+=("$((SECONDS - start))")
    write_summary
}

workers=""
"$PYTHON" -c "import xdist" 2>/dev/null && workers="-n 8"
# Tests: mostly Triton compiles (the workers share the compile cache).
# shellcheck disable=SC2086  # word splitting of the lists is intended
run_step tests "${GPU_CHECK_TESTS_S:-200}" pytest.log \
    "$PYTHON" -m pytest -q -rfEs --tb=short -p no:cacheprovider $workers $TESTS
# shellcheck disable=SC2086
run_step decode "${GPU_CHECK_DECODE_S:-240}" decode.log \
    "$PYTHON" benchmarks/gpu_decode.py $DECODE_ARGS --out "$OUT/gpu_decode.json"
# shellcheck disable=SC2086
run_step quant "${GPU_CHECK_QUANT_S:-110}" bench.log \
    "$PYTHON" benchmarks/gpu_quant.py $QUANT_ARGS --out "$OUT/gpu_quant.json"

cat "$OUT/summary.md"
failed=0
for rc in "${STEP_RCS[@]}"; do ((rc != 0)) && failed=1; done
exit $failed
