#!/usr/bin/env bash
# On the device machine: Nsight Compute's detailed sections (speed of light, occupancy, warp stall
# reasons, scheduler, memory and compute workload) for one launch of our quantized GEMM per shape,
# cold weights, the route and split-K prefill would use:
#   M=128 SHAPES="37888x3584 3584x18944" bash benchmarks/ncu_qgemm.sh   → $OUT/ncu-qgemm-<N>x<K>-m<M>.txt
# (where a GEMM's time goes: which stall dominates says whether latency, shared memory or the
# tensor cores bound it; benchmarks/ncu_kernels.sh gives every kernel's time in a whole prefill)
set -o pipefail
export PYTHONPATH=$PWD
for shape in ${SHAPES:-37888x3584 3584x18944}; do
  n=${shape%x*}; k=${shape#*x}
  /usr/local/cuda/bin/ncu --clock-control none --kernel-name regex:foundry_qgemm --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --metrics smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_imc_miss_per_issue_active.ratio,smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio,smsp__average_warps_issue_stalled_misc_per_issue_active.ratio \
    python3 - "$n" "$k" "${M:-128}" <<'PY' > "$OUT/ncu-qgemm-${n}x${k}-m${M:-128}.txt" 2>&1
import sys
import mlx.core as mx
from foundry_mlx.kernels import qgemm
from foundry_mlx.quant import QuantizedWeight
n, k, m = (int(a) for a in sys.argv[1:4])
copies = []
for seed in range(4):  # distinct weights per launch: read from device memory, as in a prefill
    dense = mx.random.uniform(-1, 1, (n, k), key=mx.random.key(seed)) * (3.0 / k) ** 0.5
    w, s, b = mx.quantize(dense, group_size=64, bits=4)
    copies.append(QuantizedWeight(w, s.astype(mx.float16), b.astype(mx.float16), 4, 64))
x = mx.random.normal((m, k)).astype(mx.float16)
mx.eval(x, [(c.weight, c.scales, c.biases) for c in copies])
for c in copies:
    mx.eval(qgemm.run("cuda", x, c))
print("tile", qgemm.tile("cuda", m, n), "split", qgemm.split_k("cuda", m, n, k, qgemm.tile("cuda", m, n)))
PY
  echo "== ${n}x${k} M=${M:-128}: rc=$?"; grep -E "Duration|Registers Per|Achieved Occupancy|issue_stalled|Issue Slots Busy|Compute \(SM\) Throughput|Memory Throughput|Warp Cycles Per Issued|tile" \
    "$OUT/ncu-qgemm-${n}x${k}-m${M:-128}.txt" | head -40
done
