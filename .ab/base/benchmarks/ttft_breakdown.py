"""Where a short prompt's time to first token goes, besides the prefill's own graph.

    python benchmarks/ttft_breakdown.py /tmp/random-qwen2.5-0.5b-4bit --length 128 [--clear-cache]

Times, in one process on the same prompt (median of `--trials` after a warm-up), three ways to the
first token: `stream_generate(max_tokens=1)` as `foundry-mlx bench` times it; the same steps done
here one by one with a wait after each (session and cache reservation, the prefill call that builds
the graph, its launches (`mx.async_eval` returns once all are issued: the host's share) and the wait
for the GPU after them, the sampler's set-up, the first token's sampling), to see which one holds the
difference; and the bare prefill into a fresh unreserved cache as benchmarks/prefill_compile_bench.py
times it.
`--clear-cache` frees MLX's buffer cache before each run (the benchmark's default).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

import foundry_mlx as fm  # noqa: E402
from foundry_mlx.engine import generate  # noqa: E402
from foundry_mlx.engine.prefill import prefill  # noqa: E402
from foundry_mlx.engine.sampling import Sampler, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--clear-cache", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile the sampler's set-up (top 15 by cumulative time)")
    args = parser.parse_args()
    profiler = cProfile.Profile() if args.profile else None
    model, tokenizer = fm.load(args.path, progress=False)
    ids = [(37 * i + 11) % 1000 for i in range(args.length)]
    times: dict[str, list[float]] = {}

    def note(label: str, seconds: float) -> None:
        times.setdefault(label, []).append(seconds * 1e3)

    for trial in range(args.trials + 1):
        if args.clear_cache:
            mx.clear_cache()
        start = time.perf_counter()
        for _ in generate.stream_generate(model, tokenizer, ids, max_tokens=1, ignore_eos=True):
            note("stream_generate, first token", time.perf_counter() - start)

        if args.clear_cache:
            mx.clear_cache()
        marks = [time.perf_counter()]
        session = generate.Session(model)
        for layer_cache in session.cache:
            layer_cache.reserve(len(ids) + 1)
        marks.append(time.perf_counter())
        logits = generate._prefill(model, session, ids)
        marks.append(time.perf_counter())
        outputs = [logits] + [c.keys for c in session.cache] + [c.values for c in session.cache]
        mx.async_eval(outputs)  # returns once every node is launched: the host's share
        marks.append(time.perf_counter())
        mx.eval(outputs)
        marks.append(time.perf_counter())
        sampling = SamplingParams()
        if profiler and trial:
            profiler.enable()
        runner = generate._runner(model, session, sampling, Sampler(sampling), ids, logits)
        if profiler:
            profiler.disable()
        marks.append(time.perf_counter())
        runner.first.item()
        marks.append(time.perf_counter())
        for label, a, b in zip(("  session + reserve", "  prefill call (graph built)",
                                "  its launches (async_eval)", "  then the wait for the GPU",
                                "  sampler set up (its arrays, graph)", "  first token sampled"), marks, marks[1:]):
            note(label, b - a)
        note("  steps in all", marks[-1] - marks[0])

        if args.clear_cache:
            mx.clear_cache()
        begin = time.perf_counter()
        cache = model.make_cache()
        logits = prefill(model, ids, cache)
        mx.eval(logits, [c.keys for c in cache], [c.values for c in cache])
        note("bare prefill (prefill_compile_bench)", time.perf_counter() - begin)
        if trial == 0:
            times.clear()  # the warm-up traces and compiles
    print(f"{args.path}, {args.length} tokens, mlx {mx.__version__}, clear cache: {args.clear_cache}")
    for label, values in times.items():
        print(f"{label:40s} {statistics.median(values):8.3f} ms  (min {min(values):.3f})")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)


if __name__ == "__main__":
    main()
