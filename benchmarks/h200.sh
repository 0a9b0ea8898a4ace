#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, split into parts that each fit one device call (< 10 minutes).
#
#   bash benchmarks/h200.sh check          # versions, GPU tests (graphs, kernels, capture), every method on a tiny
#                                          # preset with and without graphs, the device's peaks           (~3 min)
#   bash benchmarks/h200.sh kernels        # benchmarks/kernels.py: fused vs torch, 4k-32k, 2/3/4 bits   (~3 min)
#   bash benchmarks/h200.sh llama-3.1-8b   # bench, CUDA graphs, every method + xquant fused=0, 4k and 32k (~8 min)
#   bash benchmarks/h200.sh llama-3.1-8b-eager  # the same with --no-cuda-graph                       (~8 min)
#   bash benchmarks/h200.sh llama-2-7b     # bench, CUDA graphs, 4k and 32k (MHA: XQuant rebuilds from X) (~8 min)
#   bash benchmarks/h200.sh 16k            # both presets at 16k, CUDA graphs                            (~8 min)
#
# In that order of priority; the times are estimates (no part has run on a GPU yet). Results go to $OUT (the
# device tool's folder) or ./h200-results: one JSON per bench invocation (one context each, so a part cut short
# keeps what it finished) and a log per part.
set -euo pipefail

OUT=${OUT:-h200-results}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
GEN=${GEN:-128}
REPS=${REPS:-3}
METHODS=(fp16 kivi:bits=2 kivi:bits=2,group=128,prerope=1 asymkv xquant-kv xquant:bits=4 xquant:bits=4,fused=0
         xquant:bits=2 xquant-cl:bits=2)

cache_args() {
    for method in "${METHODS[@]}"; do printf -- '--cache\n%s\n' "$method"; done
}

bench() {  # bench NAME PRESET CONTEXT [extra args...]
    local name=$1 preset=$2 context=$3
    shift 3
    mapfile -t caches < <(cache_args)
    "$PYTHON" -m xqinfer bench --preset "$preset" --context "$context" --gen "$GEN" --reps "$REPS" --floors \
        "${caches[@]}" --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
}

case "${1:-}" in
    check | kernels | llama-3.1-8b | llama-3.1-8b-eager | llama-2-7b | 16k) mkdir -p "$OUT" ;;
    *)
        awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"
        exit 2
        ;;
esac

case "$1" in
    check)
        { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
          "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name(0))"
        } 2>&1 | tee "$OUT/check.log"
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_capture.py \
            "tests/test_bench.py::test_cuda_graph_replay_equals_eager" 2>&1 | tee -a "$OUT/check.log"
        for graph in "" --no-cuda-graph; do
            mapfile -t caches < <(cache_args)
            "$PYTHON" -m xqinfer bench --preset llama-tiny --device cuda --context 1k --gen 64 --reps 2 --floors \
                "${caches[@]}" --json "$OUT/check-tiny${graph:+-eager}.json" $graph 2>&1 | tee -a "$OUT/check.log"
        done
        ;;
    kernels)
        "$PYTHON" benchmarks/kernels.py --context 4k 16k 32k --dtype bf16 --bits 2 3 4 --out "$OUT/kernels.json" \
            2>&1 | tee "$OUT/kernels.log"
        ;;
    llama-3.1-8b)
        for context in 4k 32k; do bench "llama-3.1-8b-$context" llama-3.1-8b "$context"; done
        ;;
    llama-3.1-8b-eager)
        for context in 4k 32k; do bench "llama-3.1-8b-$context-eager" llama-3.1-8b "$context" --no-cuda-graph; done
        ;;
    llama-2-7b)  # trained on 4096 positions: random weights do not care, the flag says so
        for context in 4k 32k; do bench "llama-2-7b-$context" llama-2-7b "$context" --allow-extrapolation; done
        ;;
    16k)
        bench llama-3.1-8b-16k llama-3.1-8b 16k
        bench llama-2-7b-16k llama-2-7b 16k --allow-extrapolation
        ;;
esac
