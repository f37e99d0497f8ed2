#!/usr/bin/env bash
# On the device machine: where a short prefill's time goes, on the host and on the GPU (Nsight Systems).
#   MODEL=/tmp/random-qwen2.5-0.5b-4bit PROMPT=128 RUNS=20 bash benchmarks/nsys_prefill.sh   → $OUT/nsys-prefill.txt
# RUNS first tokens through `stream_generate` (as `foundry-mlx bench` times them) after 3 warm-ups,
# captured between cudaProfilerStart/Stop. The report: MLX's NVTX ranges (host time per primitive's
# eval_gpu, per commit of a CUDA graph), the CUDA API calls (graph updates and launches,
# allocations) and the GPU's kernels, each summed over the runs: divide by RUNS for one prefill.
set -o pipefail
export PYTHONPATH=$PWD
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
[ -n "$NSYS" ] || { echo "no nsys on this machine"; exit 2; }
SCRIPT="
import ctypes, time, foundry_mlx as fm, mlx.core as mx
model, tok = fm.load('${MODEL:-/tmp/random-qwen2.5-0.5b-4bit}', progress=False)
ids = list(range(100, 100 + ${PROMPT:-128}))
def first():
    start = time.perf_counter()
    for _ in fm.stream_generate(model, tok, ids, max_tokens=1, ignore_eos=True):
        return time.perf_counter() - start
for _ in range(3):
    first()
mx.synchronize()
driver = ctypes.CDLL('libcuda.so.1')
driver.cuProfilerStart()
times = [first() for _ in range(${RUNS:-20})]
mx.synchronize()
driver.cuProfilerStop()
times.sort()
print(f'first token under nsys: median {times[len(times) // 2] * 1e3:.3f} ms, min {times[0] * 1e3:.3f} ms')
"
"$NSYS" profile -t cuda,nvtx -c cudaProfilerApi -o /tmp/nsys-prefill -f true python3 -c "$SCRIPT" > /tmp/nsys-run.txt 2>&1
echo "nsys rc=$?"; grep -v "^WARNING\|^Collecting\|^Generating" /tmp/nsys-run.txt | tail -5
{ grep "first token" /tmp/nsys-run.txt; echo "runs: ${RUNS:-20}, model ${MODEL:-/tmp/random-qwen2.5-0.5b-4bit}, prompt ${PROMPT:-128}"
  "$NSYS" stats -q -r nvtx_sum,cuda_api_sum,cuda_gpu_kern_sum -f column /tmp/nsys-prefill.nsys-rep 2>&1; } \
  | cut -c1-220 > "${OUT:-/tmp}/nsys-prefill.txt"
head -60 "${OUT:-/tmp}/nsys-prefill.txt"
