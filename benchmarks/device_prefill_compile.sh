#!/usr/bin/env bash
# On the device machine (H200): eager vs compiled prefill (FOUNDRY_PREFILL_COMPILE=0/1,
# engine/prefill.py) in one call.
#   REVISION=<commit> bash benchmarks/device_prefill_compile.sh
# The compiled prefill's GPU test (TESTS=0 skips it), then `foundry-mlx bench` prefill of
# random-weight models of the real shapes at PROMPTS (default 32,128,512) for each switch value.
# SPECS="shape quant;shape quant" (default the 0.5B and 7B 4-bit). Results: $OUT/results.tgz.
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FOUNDRY_GIT_REVISION=${REVISION:-unknown}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
R=/tmp/results-prefill-compile; mkdir -p $R
trap 'tar czf "$OUT/results.tgz" -C $R .' EXIT
if [ "${TESTS:-1}" != 0 ]; then
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -m gpu tests/test_prefill.py -p no:cacheprovider \
    2>&1 | tail -20 | tee $R/h200-prefill-compile-gpu-tests.log
fi
IFS=';' read -ra specs <<< "${SPECS:-qwen2.5-0.5b 4bit;qwen2.5-7b 4bit}"
for spec in "${specs[@]}"; do
  set -- $spec
  [ -d /tmp/random-$1-$2 ] || python3 scripts/make_random_model.py --shape "$1" --quant "$2" --out /tmp/random-$1-$2 >/dev/null || exit 4
  for switch in 0 1; do
    echo "== $1 $2 FOUNDRY_PREFILL_COMPILE=$switch"
    FOUNDRY_PREFILL_COMPILE=$switch timeout ${BENCH_TIMEOUT:-200} python3 -m foundry_mlx bench -m /tmp/random-$1-$2 \
      --engines foundry --prompt-lengths ${PROMPTS:-32,128,512} --depths 0 --decode-tokens 8 \
      --out $R/h200-prefill-compile$switch-$1-$2 2>&1 | grep -v "^trial" | tail -8
  done
done
