"""Sampling kernel vs mlx-lm's sampler (`mlx_lm.sample_utils.make_sampler`) at vocab 151,936.

Both take float16 logits already on the device and produce a token id on the device; timed as
N draws queued back to back and evaluated once (the way a decode loop uses them), median of 5.
    python benchmarks/sampling_bench.py --out benchmarks/results/h200-sampling
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import numpy as np

from foundry_mlx import kernels
from foundry_mlx.kernels import fused_step, sample

SETTINGS = {  # name: (temperature, top_k, top_p, min_p, repetition penalty)
    "greedy": (0.0, 0, 1.0, 0.0, 1.0),
    "temperature 0.8": (0.8, 0, 1.0, 0.0, 1.0),
    "top-k 40": (0.8, 40, 1.0, 0.0, 1.0),
    "top-p 0.9": (0.8, 0, 0.9, 0.0, 1.0),
    "min-p 0.05": (0.8, 0, 1.0, 0.05, 1.0),
    "top-k 40 + top-p 0.9 + penalty 1.1": (0.8, 40, 0.9, 0.0, 1.1),
}


def time_draws(draw, count: int) -> float:
    for _ in range(3):
        mx.eval(draw(0))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        mx.eval([draw(i) for i in range(count)])
        samples.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args()
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    gpu = fused_step.GpuKernels(kernels.gpu_backend())
    logits = mx.array((np.random.default_rng(0).standard_normal(args.vocab) * 3).astype(np.float16))
    recent = mx.array(np.random.default_rng(1).integers(0, args.vocab, 64).astype(np.int32))
    rows = []
    for name, (temperature, top_k, top_p, min_p, penalty) in SETTINGS.items():
        params = sample.make_params(temperature, top_k, top_p, min_p, penalty)
        states = [sample.make_state(0, 0, i, 7, 64) for i in range(args.draws)]
        mx.eval(states, params)
        ours = time_draws(lambda i, params=params, states=states: gpu.sample(logits, params, states[i], recent)[1],
                          args.draws)
        sampler = make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)
        processors = make_logits_processors(repetition_penalty=penalty if penalty != 1.0 else None)
        history = recent.astype(mx.int32)

        def theirs(i, sampler=sampler, processors=processors, history=history):
            values = logits[None].astype(mx.float32)
            for processor in processors:
                values = processor(history, values)
            return sampler(values - mx.logsumexp(values, keepdims=True))

        baseline = time_draws(theirs, args.draws)
        rows.append({"setting": name, "foundry_us": ours, "mlx_lm_us": baseline, "speedup": baseline / ours})
        print(f"{name:38s} foundry {ours:8.1f} µs   mlx-lm {baseline:8.1f} µs   {baseline / ours:5.2f}x", flush=True)
    if args.out:
        with open(args.out + ".json", "w") as handle:
            json.dump({"vocab": args.vocab, "draws": args.draws, "mlx": mx.__version__, "rows": rows}, handle, indent=1)
        with open(args.out + ".md", "w") as handle:
            handle.write(f"# sampling at vocab {args.vocab}, µs per draw (median of 5 × {args.draws} draws)\n\n")
            handle.write("| setting | foundry-mlx kernel | mlx-lm sampler | speed-up |\n|---|---|---|---|\n")
            for r in rows:
                handle.write(f"| {r['setting']} | {r['foundry_us']:.1f} | {r['mlx_lm_us']:.1f} | {r['speedup']:.2f}× |\n")


if __name__ == "__main__":
    main()
