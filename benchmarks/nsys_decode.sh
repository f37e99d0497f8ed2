#!/usr/bin/env bash
# On the device machine: where a decode step's GPU time goes, kernel by kernel (Nsight Systems).
#   MODEL=/tmp/random-qwen2.5-7b-4bit TOKENS=48 bash benchmarks/nsys_decode.sh   → $OUT/nsys-*.csv
# Writes the per-kernel summary and the GPU trace (start, duration, name of every kernel) as CSV,
# so the gaps between a step's kernels can be read off as well as the kernels' own times.
set -o pipefail
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
[ -n "$NSYS" ] || { echo "no nsys on this machine"; exit 5; }
export PYTHONPATH=$PWD
$NSYS profile -q -t cuda -o /tmp/nsys-decode -f true python3 -c "
import foundry_mlx as fm, sys
model, tok = fm.load('${MODEL:-/tmp/random-qwen2.5-7b-4bit}', progress=False)
for _ in range(2):
    for r in fm.stream_generate(model, tok, list(range(100, 228)), max_tokens=${TOKENS:-48}, ignore_eos=True):
        pass
print('decoded')
" 2>&1 | tail -3
$NSYS stats -q -r cuda_gpu_kern_sum -f csv -o /tmp/nsys-sum /tmp/nsys-decode.nsys-rep >/dev/null 2>&1
$NSYS stats -q -r cuda_gpu_trace -f csv -o /tmp/nsys-trace /tmp/nsys-decode.nsys-rep >/dev/null 2>&1
ls /tmp/nsys-*.csv
cp /tmp/nsys-*.csv "$OUT"/ 2>/dev/null
head -25 /tmp/nsys-sum*.csv | cut -c1-220
