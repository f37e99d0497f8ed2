"""Eager vs compiled prefill (engine/prefill.py) of one model: time per call and graph nodes.

    python benchmarks/prefill_compile_bench.py --shape qwen2.5-0.5b --quant 4bit --lengths 128,512
    python benchmarks/prefill_compile_bench.py --path model.gguf --lengths 5,128,130

Each call prefills a fresh cache and evaluates the logits and the keys/values, as generation's
first token needs; the median of `--trials` after one warm-up (which traces). Graph nodes are what
MLX walks and dispatches per call (`engine/decoder.graph_nodes`): the number the compiled path is
meant to cut. `foundry-mlx bench` with FOUNDRY_PREFILL_COMPILE=0/1 measures the same end to end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import mlx.core as mx

from foundry_mlx.engine import prefill as prefilling
from foundry_mlx.engine.decoder import graph_nodes


def load_model(args):
    if args.path:
        from foundry_mlx import load

        return load(args.path, progress=False)[0]
    from foundry_mlx.random_model import make_random_model

    dtype = getattr(mx, args.dtype or ("float16" if mx.default_device() == mx.gpu else "float32"))
    model, _ = make_random_model(args.shape, args.quant, dtype)
    mx.eval(model.parameters())
    return model


def one_call(model, ids: list[int]) -> tuple[float, int]:
    cache = model.make_cache()
    start = time.perf_counter()
    logits = prefilling.prefill(model, ids, cache)
    outputs = [logits] + [c.keys for c in cache] + [c.values for c in cache]
    nodes = graph_nodes(*outputs) if one_call.count_nodes else 0
    mx.eval(outputs)
    return time.perf_counter() - start, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path")
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--quant", default="4bit")
    parser.add_argument("--dtype")
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    model = load_model(args)
    print(f"device {mx.default_device()}, mlx {mx.__version__}, {args.path or args.shape + ' ' + args.quant}")
    for length in [int(n) for n in args.lengths.split(",")]:
        ids = [(37 * i + 11) % 1000 for i in range(length)]
        row = []
        for switch in ("0", "1"):
            os.environ[prefilling.SWITCH] = switch
            # Nodes of the whole prefill in one trace (queued in segments, the graph left at the end
            # would be the last segment's), then a warm-up as timed: traces, compiles kernels.
            os.environ[prefilling.SEGMENTS_SWITCH], segmented = "1", os.environ.get(prefilling.SEGMENTS_SWITCH)
            one_call.count_nodes = True
            _, nodes = one_call(model, ids)
            one_call.count_nodes = False
            if segmented is None:
                del os.environ[prefilling.SEGMENTS_SWITCH]
            else:
                os.environ[prefilling.SEGMENTS_SWITCH] = segmented
            one_call(model, ids)
            seconds = statistics.median(one_call(model, ids)[0] for _ in range(args.trials))
            row.append(f"{'compiled' if switch == '1' else 'eager'} {seconds * 1e3:8.2f} ms "
                       f"({length / seconds:9.1f} tok/s, {nodes} nodes)")
        print(f"prefill {length:5d}: " + " | ".join(row))


if __name__ == "__main__":
    main()
