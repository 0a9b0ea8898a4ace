#!/usr/bin/env bash
# The decisive GPU checks in one device call of at most 8 minutes, most important first, each part under its own
# time limit so that a slow part never costs the ones after it:
#
#   1. versions, the device                                                                      (limit  30 s)
#   2. CUDA-graph replay equals eager; the Triton kernels against the torch path; capture tests   (limit 150 s)
#   3. llama-3.1-8b (random weights, bf16) at 4k and 32k with CUDA graphs: fp16, kivi:bits=2,
#      xquant:bits=4 fused and torch (fused=0), with the device's copy and matmul peaks (--floors) (limit 170 s)
#   4. the same without CUDA graphs                                                              (limit 110 s)
#
#   bash benchmarks/gpu_first.sh                          # on the device tool: results under $OUT
#   PRESET=llama-tiny DEVICE=cpu bash benchmarks/gpu_first.sh   # the script itself, smoke-tested on a CPU
#
# Results (under $OUT, else ./gpu-first-results): summary.json (each part's exit status, seconds, and whether its
# limit stopped it), one log per part, pytest's JUnit XML, and one bench JSON per (context, graphs) so that a part cut
# short keeps what it finished. The device's own python3 (its torch and triton) runs the checkout: nothing is
# installed.
set -uo pipefail

export OUT=${OUT:-gpu-first-results} PYTHON=${PYTHON:-python3} PRESET=${PRESET:-llama-3.1-8b} DEVICE=${DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PARTS=()

part() {  # part NAME LIMIT_SECONDS SHELL_COMMAND: runs it under its limit, logs it, records how it ended
    local name=$1 limit=$2 start=$SECONDS status
    timeout --signal=INT --kill-after=10 "$limit" bash -c "$3" >"$OUT/$name.log" 2>&1
    status=$?
    local seconds=$((SECONDS - start)) stopped=false
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then stopped=true; fi
    PARTS+=("{\"part\": \"$name\", \"status\": $status, \"seconds\": $seconds, \"limit_s\": $limit, \"timed_out\": $stopped}")
    tail -n 4 "$OUT/$name.log"
    echo "== $name: exit $status after ${seconds}s (limit ${limit}s)"
}

# One bench invocation per context: every method in one process, over the same random weights.
bench='bench() { "$PYTHON" -m xqinfer bench --preset "$PRESET" --device "$DEVICE" --dtype bf16 --context "$1" \
    --gen 32 --reps 2 --floors --cache fp16 --cache kivi:bits=2 --cache xquant:bits=4 --cache xquant:bits=4,fused=0 \
    --json "$OUT/bench-$1-$2.json" ${3:+"$3"}; }'

part versions 30 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
    "$PYTHON" -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA device\")
import triton; print(\"triton\", triton.__version__)"'
part tests 150 '"$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_bench.py::test_cuda_graph_replay_equals_eager tests/test_kernels.py tests/test_capture.py'
part "$PRESET-graphs" 170 "$bench"'; bench 4k graphs && bench 32k graphs'
part "$PRESET-eager" 110 "$bench"'; bench 4k eager --no-cuda-graph && bench 32k eager --no-cuda-graph'

(IFS=,; echo "{\"preset\": \"$PRESET\", \"device\": \"$DEVICE\", \"parts\": [${PARTS[*]}]}") >"$OUT/summary.json"
cat "$OUT/summary.json"
