#!/usr/bin/env bash
# On the device machine: random-weight models of real shapes, then foundry-mlx vs mlx-lm.
#   bash benchmarks/device_bench.sh "qwen2.5-0.5b q4km" "qwen2.5-0.5b 4bit"
# Each argument is "SHAPE QUANT" (see scripts/make_random_model.py); a third word "reference" also
# runs foundry-mlx alone with --kernels reference. Results: $OUT/bench-results.tgz (+ the tables).
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# The device gets a copy of the tree without .git: pass the commit in, e.g. REVISION=$(git rev-parse --short HEAD).
export FOUNDRY_GIT_REVISION=${REVISION:-unknown}
mkdir -p /tmp/results
for spec in "$@"; do
  set -- $spec
  model=/tmp/random-$1-$2
  [ -d "$model" ] || python3 scripts/make_random_model.py --shape "$1" --quant "$2" --out "$model" || exit 4
  python3 -m foundry_mlx bench -m "$model" --out "/tmp/results/h100-$1-$2" 2>&1 | grep -v "^trial" || exit 5
  if [ "$3" = reference ]; then
    python3 -m foundry_mlx bench -m "$model" --engines foundry --kernels reference \
      --out "/tmp/results/h100-$1-$2-reference-path" 2>&1 | grep -v "^trial" || exit 6
  fi
done
tar czf "$OUT/bench-results.tgz" -C /tmp/results .
