#!/usr/bin/env bash
# On the device machine (H200): benchmarks/step_overheads.py under each MLX launch setting.
#   REVISION=<commit> bash benchmarks/device_step_overheads.sh
# SETTINGS="env=value env=value;..." (one process per setting), MODEL_SPECS="shape quant;...".
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FOUNDRY_GIT_REVISION=${REVISION:-unknown}
R=/tmp/results; mkdir -p $R
IFS=';' read -ra specs <<< "${MODEL_SPECS:-qwen2.5-0.5b 4bit}"
IFS=';' read -ra settings <<< "${SETTINGS:-X=0;MLX_MAX_OPS_PER_BUFFER=1000;MLX_USE_CUDA_GRAPHS=0}"
for spec in "${specs[@]}"; do
  set -- $spec
  [ -d /tmp/random-$1-$2 ] || python3 scripts/make_random_model.py --shape "$1" --quant "$2" --out /tmp/random-$1-$2 >/dev/null || exit 4
done
for spec in "${specs[@]}"; do
  set -- $spec
  for setting in "${settings[@]}"; do
    env $setting timeout ${PROBE_TIMEOUT:-240} python3 benchmarks/step_overheads.py /tmp/random-$1-$2 \
      --label "$1 $2" ${PROBE_ARGS:---depths 0,2048} 2>&1 | grep -v Warning | tee -a $R/h200-step-overheads.jsonl
  done
done
tar czf "$OUT/results.tgz" -C $R .
