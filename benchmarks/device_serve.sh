#!/usr/bin/env bash
# On the device machine (H200): issue #10's serving check. Aggregate decode throughput of 8 concurrent
# clients against one client's, through `foundry-mlx serve` and its own scheduler (batching on: the
# batched fused step, engine/batch_decoder.py), on a random-weight model of Qwen2.5-0.5B's shape.
#   bash benchmarks/device_serve.sh        (results in $OUT; about 3 minutes)
# TOKENS="128 256" sets the reply lengths (min max) of serve_concurrency.py; TRIALS its trial pairs.
python3 -m pip install -q --no-index --no-deps .device/serve/*.whl || exit 2
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/serve-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/machine.txt"
MODEL=${MODEL:-/tmp/random-qwen2.5-0.5b-4bit}
[ -e $MODEL ] || python3 scripts/make_random_model.py --shape qwen2.5-0.5b --quant 4bit --out $MODEL >/dev/null || exit 4
read -r MIN MAX <<< "${TOKENS:-128 256}"

# The step alone (no HTTP): ms per step and graph nodes for 1, 2, 4, 8 rows vs the single fused step.
timeout 120 python3 benchmarks/fused_batch_bench.py -m $MODEL --steps 200 2>&1 | tail -8 | tee "$OUT/fused-batch-steps.txt"

PORT=18731
URL=http://127.0.0.1:$PORT
health() { python3 -c "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())" $URL/health; }
PYTHONFAULTHANDLER=1 python3 -m foundry_mlx serve -m $MODEL --host 127.0.0.1 --port $PORT --batching on --max-batch 8 \
  --prompt-cache-bytes 0 --log-level warning > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 120); do
  health >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "server exited"; tail -30 "$OUT/server.log"; exit 5; }
  sleep 1
done
health | tee "$OUT/health-before.json"
# One request alone first: if the server cannot answer it, say so with its log. Run this script
# without an outer `timeout` shorter than its own (~10 min worst case): its exit trap stops the
# server, which a client still running would see as "connection refused".
python3 - $URL <<'PY' > "$OUT/first-request.txt" 2>&1 || { cat "$OUT/first-request.txt"; tail -60 "$OUT/server.log"; exit 7; }
import json, sys, urllib.request
body = json.dumps({"model": json.load(urllib.request.urlopen(sys.argv[1] + "/v1/models"))["data"][0]["id"], "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}).encode()
request = urllib.request.Request(sys.argv[1] + "/v1/completions", body, {"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=300).read().decode())
PY
# Warm-up, not measured: MLX compiles each kernel shape on first use (slot counts 1, 2, 4, 8 and the
# cache lengths these replies reach), so it runs the measurement's own requests once.
timeout 300 python3 benchmarks/serve_concurrency.py --url $URL --clients 8 --min-tokens $MIN --max-tokens $MAX \
  > "$OUT/warmup.txt" 2>&1 || { cat "$OUT/warmup.txt"; tail -30 "$OUT/server.log"; exit 6; }
# The measurement: 8 requests one after another (one client alone), then the same 8 at once.
timeout 150 python3 benchmarks/serve_concurrency.py --url $URL --clients 8 --min-tokens $MIN --max-tokens $MAX \
  --trials ${TRIALS:-2} 2>&1 | tee "$OUT/serve-concurrency.txt"
health | tee "$OUT/health-after.json"
python3 - "$OUT/serve-concurrency.txt" <<'PY' | tee "$OUT/verdict.txt"
import re, sys
text = open(sys.argv[1]).read()
alone = float(re.search(r"one after another: .*?, ([\d.]+) tok/s", text).group(1))
together = float(re.search(r"concurrently: .*?, ([\d.]+) tok/s", text).group(1))
print(f"8 concurrent clients: {together:.0f} tok/s aggregate; one client alone: {alone:.0f} tok/s; "
      f"{together / alone:.2f}x (issue #10 asks >= 3x): {'PASS' if together >= 3 * alone else 'FAIL'}")
PY
tail -20 "$OUT/server.log" > "$OUT/server-tail.log"
