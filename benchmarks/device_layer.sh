#!/usr/bin/env bash
# On the device machine (H200): one round of layer-kernel work, in one call (results: $OUT/results[-$TAG].tgz).
#   REVISION=<commit> TESTS=1 TIMING=1 SPECS="qwen2.5-0.5b 4bit" bash benchmarks/device_layer.sh
# TESTS=1: the GPU tests the layer kernel and the split attention rest on (layer kernel = five
#   kernels, greedy tokens = reference path, split attention = MLX's SDPA, the sampling kernel's
#   distribution), with short tracebacks.
# TIMING=1: benchmarks/layer_timing.py's clock marks per phase, at depths 128 and 2048.
# SPECS="shape quant [engines [NAME=value ...]];...": foundry-mlx vs mlx-lm (or the engines named) decode
#   after prompts of 128 and 2,048 tokens, with a switch set for that run if one is named, e.g.
#   SPECS="qwen2.5-7b 4bit foundry;qwen2.5-7b 4bit foundry FOUNDRY_GEMV_PRELOAD=1".
# STARTUP=1 / LLAMA=1: see their blocks at the end.
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FOUNDRY_GIT_REVISION=${REVISION:-unknown}
R=/tmp/results-layer; rm -rf $R; mkdir -p $R
trap 'tar czf "$OUT/results${TAG:+-$TAG}.tgz" -C $R .' EXIT
IFS=';' read -ra specs <<< "${SPECS:-}"
for spec in "qwen2.5-0.5b 4bit" "${specs[@]}"; do
  set -- $spec
  [ -d /tmp/random-$1-$2 ] || python3 scripts/make_random_model.py --shape "$1" --quant "$2" --out /tmp/random-$1-$2 \
    >/dev/null 2>&1 || exit 4
done
if [ -n "$TESTS" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu ${TEST_FILES:-tests/kernels/test_fused_gpu.py tests/kernels/test_sdpa.py} \
    -k "${TEST_FILTER:-layer_kernel or greedy or split or distribution}" --tb=short -p no:cacheprovider 2>&1 \
    | tail -60 | tee $R/h200-gpu-tests-${REVISION:-unknown}.log
fi
if [ -n "$TIMING" ]; then
  timeout ${TIMING_TIMEOUT:-200} python3 benchmarks/layer_timing.py /tmp/random-qwen2.5-0.5b-4bit --depths 128,2048 \
    2>&1 | grep -v "weights" | tee $R/h200-layer-timing-${REVISION:-unknown}.txt
fi
for spec in "${specs[@]}"; do
  set -- $spec
  switches="${*:4}"; tag=$(echo "$switches" | sed 's/FOUNDRY_//g; s/=/-/g; s/ /_/g')
  echo "== $1 $2 ${3:-foundry,mlx-lm} $switches"
  env FOUNDRY_NOTHING= $switches timeout ${BENCH_TIMEOUT:-300} python3 -m foundry_mlx bench -m /tmp/random-$1-$2 \
    --engines ${3:-foundry,mlx-lm} \
    ${BENCH_ARGS:---prompt-lengths 128 --depths 0,2048 --decode-tokens 128 --trials 3} \
    --out $R/h200-$1-$2${tag:+-$tag}-${REVISION:-unknown} 2>&1 | grep -v "^trial" | tail -${BENCH_TAIL:-14}
done
# STARTUP=1: benchmarks/startup_bench.py (first token in a fresh process, MLX's cache cold and warm, vs mlx-lm).
if [ -n "$STARTUP" ]; then
  timeout ${STARTUP_TIMEOUT:-300} python3 benchmarks/startup_bench.py /tmp/random-qwen2.5-0.5b-4bit \
    --out $R/h200-startup-${REVISION:-unknown} 2>&1 | tail -12 | tee $R/h200-startup-${REVISION:-unknown}.txt
fi
# LLAMA=1: llama.cpp's llama-bench on the same-shape GGUFs built on this machine (.device/llcpp/build.sh,
# or benchmarks/llamacpp_baseline.sh build), by benchmarks/llamacpp_baseline.sh bench.
if [ -n "$LLAMA" ]; then
  PROMPTS=128,512 REPS=3 DEPTH=2048 bash benchmarks/llamacpp_baseline.sh bench | tee $R/h200-llamacpp-${REVISION:-unknown}.md
fi
