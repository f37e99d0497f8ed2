#!/usr/bin/env bash
# On the device machine: one model, 1 process vs 2 ranks (tensor- and pipeline-parallel), same tokens?
#   nvidia-h200-x2:  bash benchmarks/device_distributed.sh                  # NCCL, one GPU per rank
#   one GPU, check:  BACKEND=ring SHAPE=qwen2.5-0.5b QUANT=q4km bash benchmarks/device_distributed.sh
# SHAPE/QUANT as in scripts/make_random_model.py (default: the 7B shape, 4-bit); PROMPT and DECODE
# set the lengths. Writes $OUT/{single,tensor,pipeline}.json, the logs, and $OUT/summary.md: prefill
# and decode tok/s per run, weight GB per rank, and whether every run's greedy tokens equal the
# single process's (the script exits 1 if not). mlx.launch exits 0 even when a rank fails: the
# summary's "no result" rows are what shows it.
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # NVLink multicast off on these machines (see the device tool's KINDS.md)
backend=${BACKEND:-nccl}; shape=${SHAPE:-qwen2.5-7b}; quant=${QUANT:-4bit}
prompt=${PROMPT:-512}; decode=${DECODE:-128}
model=/tmp/random-$shape-$quant
[ -d "$model" ] || python3 scripts/make_random_model.py --shape "$shape" --quant "$quant" --out "$model" || exit 4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
bench=(benchmarks/distributed_bench.py --model "$model" --prompt-tokens "$prompt" --decode-tokens "$decode")
python3 "${bench[@]}" --out "$OUT/single.json" 2>&1 | tee "$OUT/single.log"
for parallel in tensor pipeline; do
  timeout 540 mlx.launch --backend "$backend" -n 2 -- python3 "${bench[@]}" --parallel "$parallel" \
    --out "$OUT/$parallel.json" 2>&1 | tee "$OUT/$parallel.log"
done
python3 benchmarks/distributed_bench.py --compare "$OUT/single.json" "$OUT/tensor.json" "$OUT/pipeline.json" \
  | tee "$OUT/summary.md"
