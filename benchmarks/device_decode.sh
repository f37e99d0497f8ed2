#!/usr/bin/env bash
# On the device machine (H200): the decode issue's whole measurement in one call.
#   REVISION=<commit> bash benchmarks/device_decode.sh
# GPU tests (fused step, sampling kernel), the sampling micro-benchmark, start-up times, then
# foundry-mlx vs mlx-lm on random-weight models of the real shapes. SPECS="shape quant;shape quant".
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FOUNDRY_GIT_REVISION=${REVISION:-unknown}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
R=/tmp/results; mkdir -p $R
IFS=';' read -ra specs <<< "${SPECS:-qwen2.5-0.5b 4bit;qwen2.5-0.5b q4km}"
for spec in "${specs[@]}"; do
  set -- $spec
  [ -d /tmp/random-$1-$2 ] || python3 scripts/make_random_model.py --shape "$1" --quant "$2" --out /tmp/random-$1-$2 >/dev/null || exit 4
done
if [ -n "$GPU_TESTS" ]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m gpu $GPU_TESTS -p no:cacheprovider 2>&1 | tail -40 | tee $R/h200-gpu-tests.log
fi
[ -n "$SAMPLING" ] && timeout 120 python3 benchmarks/sampling_bench.py --out $R/h200-sampling 2>&1 | tail -8
[ -n "$STARTUP" ] && timeout 300 python3 benchmarks/startup_bench.py /tmp/random-qwen2.5-0.5b-4bit --out $R/h200-startup 2>&1 | tail -4
for spec in "${specs[@]}"; do
  set -- $spec
  timeout ${BENCH_TIMEOUT:-300} python3 -m foundry_mlx bench -m /tmp/random-$1-$2 ${BENCH_ARGS:---prompt-lengths 128 --depths 0,2048 --decode-tokens 128} \
    --out $R/h200-$1-$2 2>&1 | grep -v "^trial" | tail -12
done
tar czf "$OUT/results.tgz" -C $R .
