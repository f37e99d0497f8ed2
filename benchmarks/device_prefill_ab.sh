#!/usr/bin/env bash
# On the device machine (H200): one round of prefill GEMM work in one call, results in $OUT/results.tgz.
#   REVISION=<commit> BASE=.ab/base bash benchmarks/device_prefill_ab.sh
# BASE: a copy of an earlier foundry_mlx package to compare against (made here with
#   `mkdir -p .ab/base && git archive <commit> foundry_mlx | tar -x -C .ab/base`; git-ignored, so the
#   device call must carry it: carry [".device/b", ".ab"]).
# 1. GPU tests of the GEMM (TEST_FILES, default tests/kernels/test_qgemm_gpu.py; TEST_FILTER: -k) unless TESTS=0.
# 2. Prefill alone (benchmarks/prefill_compile_bench.py, compiled, buffers kept) of the 7B and the
#    0.5B at LENGTHS (default 128), this tree against BASE in alternation (this, base, this, base),
#    with FOUNDRY_QGEMM=${AB_QGEMM:-1} so both run our kernel wherever it can.
#    AB_SWITCHES="NAME=value[ NAME=value];...": instead, this tree alone with each setting in turn
#    (and none first), in alternation, e.g. "FOUNDRY_QGEMM_AHEAD=2;FOUNDRY_QGEMM_AHEAD=3"; a setting
#    PYTHONPATH=.ab/base runs BASE's package instead. AB=0: skip this step.
# 3. QGEMM_ARGS: benchmarks/qgemm_bench.py with those arguments (e.g. `--shapes 7b:gate_up --rows 128
#    --splits 1,2,4 --no-tiles`), if given.
# 4. NCU_SHAPES: benchmarks/ncu_qgemm.sh on those shapes at M=128, if given.
# 5. `foundry-mlx bench` for each of SPECS ("shape engines prompt-lengths decode-tokens [NAME=value ...]
#    [--flag ...];..."), e.g. "qwen2.5-0.5b foundry 128 4 FOUNDRY_QGEMM=0 --keep-buffers".
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONUNBUFFERED=1 FOUNDRY_GIT_REVISION=${REVISION:-unknown}
HERE=$PWD
R=/tmp/results-ab; rm -rf $R; mkdir -p $R
trap 'tar czf "$OUT/results.tgz" -C $R .' EXIT
for s in qwen2.5-0.5b qwen2.5-7b; do
  [ -d /tmp/random-$s-4bit ] || PYTHONPATH=$HERE python3 scripts/make_random_model.py --shape $s --quant 4bit \
    --out /tmp/random-$s-4bit >/dev/null 2>&1 || exit 4
done
if [ "${TESTS:-1}" != 0 ]; then
  PYTHONPATH=$HERE timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -m gpu ${TEST_FILES:-tests/kernels/test_qgemm_gpu.py} -k "${TEST_FILTER:-}" -p no:cacheprovider \
    --tb=short 2>&1 | tail -15 | tee $R/h200-qgemm-gpu-tests-${REVISION:-unknown}.log
fi
# A llama.cpp build on the same host (benchmarks/llamacpp_baseline.sh) slows every host-bound number:
# say so in the results rather than let it pass unnoticed.
load="load average $(cut -d' ' -f1-3 /proc/loadavg)"
tail -1 /root/llbase/status 2>/dev/null | grep -q DONE || [ ! -d /root/llbase ] || load="$load, llama.cpp build RUNNING"
echo "# $load" > $R/load.txt
IFS=';' read -ra settings <<< "${AB_SWITCHES:+FOUNDRY_NOTHING=;$AB_SWITCHES}"
[ "${AB:-1}" = 0 ] && AB_MODELS=" "
for s in ${AB_MODELS:-qwen2.5-7b qwen2.5-0.5b}; do
  if [ ${#settings[@]} -gt 0 ]; then runs=("${settings[@]}" "${settings[@]}"); else runs=(${AB_ORDER:-this base this base}); fi
  for run in "${runs[@]}"; do
    path=$HERE; switches=(FOUNDRY_NOTHING=)
    if [ ${#settings[@]} -gt 0 ]; then read -ra switches <<< "$run"; elif [ "$run" = base ]; then path=$HERE/${BASE:-.ab/base}; fi
    [ -d "$path/foundry_mlx" ] || { echo "no $path/foundry_mlx"; continue; }
    echo "== $s $run"
    env FOUNDRY_QGEMM=${AB_QGEMM:-1} PYTHONPATH=$path "${switches[@]}" timeout ${AB_TIMEOUT:-90} \
      python3 benchmarks/prefill_compile_bench.py --path /tmp/random-$s-4bit --lengths ${LENGTHS:-128} \
      --trials ${AB_TRIALS:-9} 2>&1 | tail -${AB_TAIL:-2}
  done
done 2>&1 | { cat $R/load.txt; cat; } | tee $R/h200-prefill-ab-${REVISION:-unknown}.txt
if [ -n "$QGEMM_ARGS" ]; then
  PYTHONPATH=$HERE timeout ${QGEMM_TIMEOUT:-150} python3 benchmarks/qgemm_bench.py $QGEMM_ARGS \
    --out $R/h200-qgemm-${REVISION:-unknown} 2>&1 | tail -12
fi
if [ -n "$NCU_SHAPES" ]; then
  mkdir -p $R/ncu; OUT=$R/ncu SHAPES="$NCU_SHAPES" PYTHONPATH=$HERE timeout ${NCU_TIMEOUT:-120} bash benchmarks/ncu_qgemm.sh
fi
IFS=';' read -ra specs <<< "${SPECS:-}"
for spec in "${specs[@]}"; do
  set -- $spec
  switches=(); flags=()
  for word in "${@:5}"; do [[ $word == *=* ]] && switches+=("$word") || flags+=("$word"); done
  tag=$(echo "${*:5}" | sed 's/FOUNDRY_//g; s/--//g; s/=/-/g; s/ /_/g')
  echo "== bench $1 $2 prompts $3 decode $4 ${*:5}"
  env PYTHONPATH=$HERE "${switches[@]}" timeout ${BENCH_TIMEOUT:-200} python3 -m foundry_mlx bench -m /tmp/random-$1-4bit \
    --engines $2 --prompt-lengths $3 --depths 0 --decode-tokens $4 --trials ${BENCH_TRIALS:-3} "${flags[@]}" \
    --out $R/h200-$1-4bit-${2//,/-}${tag:+-$tag}-${REVISION:-unknown} 2>&1 | grep -v "^trial" | tail -${BENCH_TAIL:-12}
done
