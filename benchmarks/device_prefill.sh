#!/usr/bin/env bash
# On the device machine (H200): the prefill GEMM issue's (#11) measurement in one call.
#   REVISION=<commit> bash benchmarks/device_prefill.sh
# Phases (each on unless set to 0): TESTS=1 the quantized GEMM's GPU tests; MICRO=1 the kernel and
# the dense route vs mx.quantized_matmul micro-benchmark (MICRO_ARGS, e.g. --quick); E2E=1 prefill
# of random-weight models of the real shapes for each FOUNDRY_QGEMM in SWITCHES (default
# "0 1 dense auto": MLX's quantized_matmul, the kernel, dequantize + dense matmul, the table).
# SPECS="shape quant;shape quant". Results: $OUT/results.tgz (and the logs on stdout).
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FOUNDRY_GIT_REVISION=${REVISION:-unknown}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
R=/tmp/results-prefill; mkdir -p $R
trap 'tar czf "$OUT/results.tgz" -C $R .' EXIT
if [ "${TESTS:-1}" != 0 ]; then
  timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -m gpu tests/kernels/test_qgemm_gpu.py -p no:cacheprovider \
    2>&1 | tail -60 | tee $R/h200-qgemm-gpu-tests.log
fi
if [ "${MICRO:-1}" != 0 ]; then
  timeout ${MICRO_TIMEOUT:-260} python3 benchmarks/qgemm_bench.py ${MICRO_ARGS:-} --out $R/h200-qgemm 2>&1 | tail -70
fi
if [ "${E2E:-1}" != 0 ]; then
  IFS=';' read -ra specs <<< "${SPECS:-qwen2.5-0.5b 4bit;qwen2.5-7b 4bit}"
  for spec in "${specs[@]}"; do
    set -- $spec
    [ -d /tmp/random-$1-$2 ] || python3 scripts/make_random_model.py --shape "$1" --quant "$2" --out /tmp/random-$1-$2 >/dev/null || exit 4
    for switch in ${SWITCHES:-0 1 dense auto}; do
      echo "== $1 $2 FOUNDRY_QGEMM=$switch"
      FOUNDRY_QGEMM=$switch timeout ${BENCH_TIMEOUT:-240} python3 -m foundry_mlx bench -m /tmp/random-$1-$2 \
        --engines foundry --prompt-lengths ${PROMPTS:-128,512,2048} --depths 0 --decode-tokens 8 \
        --out $R/h200-prefill-$1-$2-qgemm$switch 2>&1 | grep -v "^trial" | tail -12
    done
  done
fi
