#!/usr/bin/env bash
# On the device machine (H200): the three open questions of issues #7 and #11, in one call.
#   REVISION=<commit> bash benchmarks/device_probes.sh        (results: $OUT/results.tgz)
# 1. Where a layer-kernel launch spends its ~37 µs (clock marks, benchmarks/layer_timing.py).
# 2. Whether more blocks unblock the 7B's split attention at depth 2048 (FOUNDRY_ATTENTION_BLOCKS).
# 3. How much of a short prefill is buffer allocation: `bench` freeing MLX's buffers before each
#    run (the default) vs --keep-buffers, 0.5B and 7B at 128 and 512 tokens.
# KERNELS=1 instead: the GEMV kernels against MLX's ops at two FOUNDRY_GEMV_TARGET_WARPS values
#    (how far K is split: the 7B o_proj ran at 0.71x MLX), nothing else.
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FOUNDRY_GIT_REVISION=${REVISION:-unknown}
R=/tmp/results-probes; mkdir -p $R
trap 'tar czf "$OUT/results.tgz" -C $R .' EXIT
if [ -n "$KERNELS" ]; then
  for target in 8192 2048; do
    FOUNDRY_GEMV_TARGET_WARPS=$target timeout 200 python3 benchmarks/kernels_bench.py \
      --out $R/h200-kernels-target$target 2>&1 | tail -8
  done
  exit 0
fi
for quant in 4bit; do
  for shape in qwen2.5-0.5b qwen2.5-7b; do
    [ -d /tmp/random-$shape-$quant ] || python3 scripts/make_random_model.py --shape $shape --quant $quant \
      --out /tmp/random-$shape-$quant >/dev/null || exit 4
  done
done
timeout 120 python3 benchmarks/layer_timing.py /tmp/random-qwen2.5-0.5b-4bit --depths 0,2048 2>&1 \
  | tee $R/h200-layer-timing.txt
for blocks in 256 1024; do
  echo "== 7B decode, FOUNDRY_ATTENTION_BLOCKS=$blocks"
  FOUNDRY_ATTENTION_BLOCKS=$blocks timeout 150 python3 -m foundry_mlx bench -m /tmp/random-qwen2.5-7b-4bit \
    --engines foundry --prompt-lengths 128 --depths 2048 --decode-tokens 64 --trials 2 \
    --out $R/h200-qwen2.5-7b-4bit-attention-blocks$blocks 2>&1 | grep "^| decode"
done
for shape in qwen2.5-0.5b qwen2.5-7b; do
  for keep in "" --keep-buffers; do
    echo "== $shape prefill ${keep:-(buffers freed before each run)}"
    timeout 120 python3 -m foundry_mlx bench -m /tmp/random-$shape-4bit --engines foundry --prompt-lengths 128,512 \
      --depths 0 --decode-tokens 8 --trials 3 $keep --out $R/h200-prefill-$shape${keep:+-keep} 2>&1 | grep "^| prefill"
  done
done
