#!/usr/bin/env bash
# On the device machine: llama.cpp's CUDA llama-bench beside foundry-mlx, same machine, same shapes.
#   build (detached, in the first call, with .device/llcpp carried; ~10 min on 16 cores at nice 19):
#     setsid nohup bash benchmarks/llamacpp_baseline.sh build > /root/llbase.out 2>&1 < /dev/null &
#   bench (a later call on the same warm machine; waits up to LLAMA_WAIT seconds for the build):
#     LLAMA_WAIT=300 bash benchmarks/llamacpp_baseline.sh bench > $OUT/h200-llamacpp-<rev>.md
# build: the kit's build.sh (../shared/device/llamacpp: llama-bench, llama-quantize, the 0.5B-shape
# GGUFs), then the 7B-shape F16 GGUF (make_synth_7b_gguf.py, ~15 GB) quantized to Q4_K_M and Q4_0, the
# F16 removed (QUANTS_7B="Q4_K_M" for one). Its last line in /root/llbase/status is "DONE rc=N".
# bench: prompt processing at PROMPTS tokens (default 128,512) and tg128, REPS repetitions (default
# 10: llama-bench's pp128 spreads widely over 3), and with DEPTH=N tg128 after N tokens too, for
# every GGUF built (the kit's build.sh alone makes the 0.5B ones); rows as llama-bench's markdown.
# Measure foundry-mlx only once the build says DONE: nice 19 or not, 16 compile jobs on the 16 cores
# took the host-bound 0.5B pp128 from 17,626 to 11,667-13,679 tok/s and its decode from ~1,300 to 964
# (H200, f4a2f4c). `bash benchmarks/llamacpp_baseline.sh wait` blocks until then (LLAMA_WAIT seconds).
set -u
B=/root/ll/llama.cpp/build/bin
S=/root/llbase; mkdir -p $S
case "${1:-}" in
build)  # the next call replaces the working tree: run from private copies (build.sh copies the kit)
  cp "$0" $S/baseline.sh && exec bash $S/baseline.sh _build "$(pwd)/.device/llcpp/build.sh"
  ;;
_build)
  nice -n 19 bash "$2" > $S/kit.out 2>&1
  tail -1 /root/llkit/build.log > $S/status
  grep -q "BUILD rc=0" $S/status || { echo "DONE rc=build-failed" >> $S/status; exit 1; }
  nice -n 19 python3 /root/llkit-src/make_synth_7b_gguf.py /root/llkit-src/tokenizer.json.gz \
    /root/llkit/synth-7b-f16.gguf > $S/synth7b.log 2>&1 \
    || { echo "DONE rc=synth-7b-failed" >> $S/status; exit 1; }
  for q in ${QUANTS_7B:-Q4_K_M Q4_0}; do
    nice -n 19 $B/llama-quantize /root/llkit/synth-7b-f16.gguf /root/llkit/synth-7b-$q.gguf $q > $S/quant7b-$q.log 2>&1 \
      || { echo "DONE rc=quantize-7b-$q-failed" >> $S/status; exit 1; }
  done
  rm -f /root/llkit/synth-7b-f16.gguf
  echo "DONE rc=0" >> $S/status
  ;;
wait)  # until the build (and its 7B GGUFs) is done or LLAMA_WAIT seconds pass; then the host is quiet
  for _ in $(seq 1 "${LLAMA_WAIT:-600}"); do tail -1 $S/status 2>/dev/null | grep -q "DONE" && break; sleep 1; done
  echo "llama.cpp build: $(tail -1 $S/status 2>/dev/null); load average $(cut -d' ' -f1-3 /proc/loadavg)"
  ;;
bench)
  for _ in $(seq 1 "${LLAMA_WAIT:-0}"); do tail -1 $S/status 2>/dev/null | grep -q "DONE" && break; sleep 1; done
  echo "<!-- build: $(cat $S/status 2>/dev/null | tr '\n' ' ') -->"
  if ! tail -1 /root/llkit/build.log 2>/dev/null | grep -q "BUILD rc=0"; then
    echo "<!-- llama.cpp build not finished: $(tail -1 /root/llkit/build.log 2>/dev/null) -->"
    exit 0
  fi
  models="synth-0.5b-Q4_0 synth-0.5b-Q4_K_M"  # the 7B ones only once written whole
  tail -1 $S/status 2>/dev/null | grep -q "DONE rc=0" && models="$models synth-7b-Q4_K_M synth-7b-Q4_0"
  for m in $models; do
    [ -f /root/llkit/$m.gguf ] || { echo "<!-- $m.gguf not built -->"; continue; }
    echo "<!-- $m -->"
    $B/llama-bench -m /root/llkit/$m.gguf -p "${PROMPTS:-128,512}" -n 128 -ngl 99 -r "${REPS:-10}" -o md 2>&1 | grep "^|"
    [ -z "${DEPTH:-}" ] || $B/llama-bench -m /root/llkit/$m.gguf -d "$DEPTH" -p 0 -n 128 -ngl 99 -r "${REPS:-10}" -o md 2>&1 \
      | grep "^|"
  done
  ;;
*)
  echo "usage: bash benchmarks/llamacpp_baseline.sh build|wait|bench (see the comment at its top)" >&2
  exit 2
  ;;
esac
