"""Why foundry-mlx's prefill measures slower when `foundry-mlx bench` interleaves it with mlx-lm.

    python benchmarks/bench_interference.py /tmp/random-qwen2.5-0.5b-4bit [--length 128] [--trials 9]

Measured on the H200 (6eb4c44, benchmarks/results/h200-qwen2.5-0.5b-4bit-*-6eb4c44.md): the same
0.5B pp128 gave 21,121 tok/s with `--engines foundry` and 15,193 with `--engines foundry,mlx-lm`
(both `--keep-buffers`). This runs foundry-mlx's time to first token (bench.py's `_timed_stream`,
buffers kept) after each kind of neighbour in turn, so the one that slows it shows:
  alone            foundry prefill + 16-token decode, nothing else (as `--engines foundry`)
  after mlx-lm     the same, each run preceded by an mlx-lm prefill + 16-token decode (as the bench)
  after mlx-lm, gc the same with a `gc.collect()` before foundry's run
  after mlx-lm, sync the same with `mx.synchronize()` on every stream mlx-lm used
  after mlx-lm prefill only: mlx-lm's neighbour run without its decode
  after 50 ms idle the host and GPU idle for about an mlx-lm run's time (clocks ramping down?)
Medians and minima of tok/s; CUDA or Metal.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foundry_mlx import bench  # noqa: E402
from foundry_mlx.loader import load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--trials", type=int, default=9)
    args = parser.parse_args()
    model, tokenizer = load(args.path)
    ours = bench.foundry_engine(model, tokenizer)
    theirs = bench.mlx_lm_engine(Path(args.path), ours.weight_bytes, ours.kv_bytes_per_position)
    prompt = [(37 * i + 11) % (model.config.vocab_size // 2) for i in range(args.length)]

    def mlx_lm_full() -> None:
        bench._timed_stream(theirs, prompt, args.decode + 1, clear_cache=False)

    def mlx_lm_prefill() -> None:
        bench._timed_stream(theirs, prompt, 1, clear_cache=False)

    def synchronized() -> None:
        mlx_lm_full()
        from mlx_lm.generate import generation_stream

        mx.synchronize(generation_stream)
        mx.synchronize()

    def collected() -> None:
        mlx_lm_full()
        gc.collect()

    scenarios = {"alone": None, "after mlx-lm": mlx_lm_full, "after mlx-lm, gc": collected,
                 "after mlx-lm, sync": synchronized, "after mlx-lm prefill only": mlx_lm_prefill,
                 "after 50 ms idle": lambda: time.sleep(0.05)}
    for engine in (ours, theirs):  # warm-up: compiles kernels and traces
        bench._timed_stream(engine, prompt, args.decode + 1, clear_cache=False)
    print(f"{args.path}: foundry-mlx prefill of {args.length} tokens, tok/s (median [min]) over {args.trials} runs")
    for _ in range(2):  # twice, so drift over the run shows
        for name, neighbour in scenarios.items():
            rates = []
            for _ in range(args.trials):
                if neighbour is not None:
                    neighbour()
                ttft, *_ = bench._timed_stream(ours, prompt, args.decode + 1, clear_cache=False)
                rates.append(args.length / ttft)
            print(f"  {name:28s} {statistics.median(rates):9.1f} [{min(rates):9.1f}]", flush=True)


if __name__ == "__main__":
    main()
