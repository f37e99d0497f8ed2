#!/usr/bin/env bash
# On the device machine: each kernel's own GPU time in a decode step or a prefill (Nsight Compute,
# kernels replayed one at a time, so gaps between them are not counted: their sum against the
# step's wall time is the share the gaps and the host take).
#   MODEL=/tmp/random-qwen2.5-7b-4bit SKIP=1430 COUNT=143 bash benchmarks/ncu_kernels.sh    → $OUT/ncu-kernels.csv
#   (decode: our custom kernels only, SKIP past prefill and warm-up, COUNT = one step's launches)
#   MODE=prefill PROMPT=128 MODEL=/tmp/random-qwen2.5-7b-4bit SKIP=0 COUNT=5000 bash benchmarks/ncu_kernels.sh
#   (prefill: every kernel, MLX's included, of one 128-token prefill after a warm-up prefill; the
#   warm-up is left out by cuProfilerStart/Stop around the timed one)
set -o pipefail
export PYTHONPATH=$PWD
if [ "${MODE:-decode}" = prefill ]; then
  SCRIPT="
import foundry_mlx as fm
model, tok = fm.load('${MODEL:-/tmp/random-qwen2.5-7b-4bit}', progress=False)
import ctypes, mlx.core as mx
ids = list(range(100, 100 + ${PROMPT:-128}))
for r in fm.stream_generate(model, tok, ids, max_tokens=1, ignore_eos=True):  # compiles and warms
    pass
mx.synchronize()
driver = ctypes.CDLL('libcuda.so.1')
driver.cuProfilerStart()  # ncu profiles from here (--profile-from-start off): the second prefill only
for r in fm.stream_generate(model, tok, ids, max_tokens=1, ignore_eos=True):
    pass
mx.synchronize()
driver.cuProfilerStop()
"
  FILTER=(--profile-from-start off)
else
  FILTER=(--kernel-name regex:custom_kernel); SCRIPT="
import foundry_mlx as fm
model, tok = fm.load('${MODEL:-/tmp/random-qwen2.5-7b-4bit}', progress=False)
for r in fm.stream_generate(model, tok, list(range(100, 228)), max_tokens=${TOKENS:-40}, ignore_eos=True):
    pass
"
fi
/usr/local/cuda/bin/ncu --clock-control none --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum "${FILTER[@]}" \
  --launch-skip ${SKIP:-1430} --launch-count ${COUNT:-286} python3 -c "$SCRIPT" > /tmp/ncu-kernels.csv 2>/tmp/ncu-kernels.err
echo "ncu rc=$?"; tail -3 /tmp/ncu-kernels.err
cp /tmp/ncu-kernels.csv "$OUT"/
python3 - <<'PY'
import csv, collections
rows = [r for r in csv.reader(open('/tmp/ncu-kernels.csv')) if len(r) > 10]
head, rows = rows[0], rows[1:]
name_i, metric_i, value_i = head.index('Kernel Name'), head.index('Metric Name'), head.index('Metric Value')
unit_i = head.index('Metric Unit')
SCALE = {'nsecond': 1, 'usecond': 1e3, 'msecond': 1e6, 'byte': 1, 'Kbyte': 1e3, 'Mbyte': 1e6, 'Gbyte': 1e9}
total = collections.defaultdict(lambda: [0, 0.0, 0.0])
for r in rows:
    key = r[name_i].split('(')[0][-60:]
    v = float(r[value_i].replace(',', '')) * SCALE.get(r[unit_i], 1)
    if r[metric_i] == 'gpu__time_duration.sum':
        total[key][0] += 1; total[key][1] += v
    else:
        total[key][2] += v
all_ns = sum(t[1] for t in total.values())
for k, (n, ns, b) in sorted(total.items(), key=lambda kv: -kv[1][1]):
    print(f"{k:60s} x{n:4d} {ns/n/1000:8.2f} us each  {b/ns if ns else 0:7.1f} GB/s  {ns/all_ns*100:5.1f}%")
print(f"sum of kernel times: {all_ns/1e6:.3f} ms over {sum(t[0] for t in total.values())} launches")
PY
