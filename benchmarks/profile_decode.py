"""Where a decode step's time goes: kernels vs reference path, compiled vs eager.

For a random-weight model of a real shape it decodes N tokens four ways (reference/custom
kernels × eager/compiled step) and prints ms per token, plus the time Python takes to *build*
one eager step's graph (no evaluation): when that is close to the step time, the host, not the
GPU, sets the speed.

    python benchmarks/profile_decode.py --shape qwen2.5-0.5b --quant q4km
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from foundry_mlx import kernels  # noqa: E402
from foundry_mlx.engine.decoder import Decoder  # noqa: E402
from foundry_mlx.random_model import make_random_model  # noqa: E402


def decode_rate(model, decoder: Decoder, prompt: mx.array, tokens: int) -> float:
    """ms per token of a pipelined greedy decode (as the engine runs it)."""
    cache = model.make_cache()
    for layer_cache in cache:
        layer_cache.reserve(prompt.shape[1] + tokens + 1)
    token = mx.argmax(model(prompt, cache, last_only=True)[:, -1, :], axis=-1)
    mx.eval(token)
    start = time.perf_counter()
    for _ in range(tokens):
        token = mx.argmax(decoder(token, cache), axis=-1)
        mx.async_eval(token)
    mx.eval(token)
    return (time.perf_counter() - start) / tokens * 1e3


def build_time(model, prompt: mx.array) -> float:
    """ms to build (not run) one eager decode step's graph."""
    cache = model.make_cache()
    mx.eval(model(prompt, cache))
    token = mx.array([[1]])
    times = []
    for _ in range(20):
        start = time.perf_counter()
        logits = model(token, cache, last_only=True)
        times.append(time.perf_counter() - start)
        mx.eval(logits)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--quant", default="q4km")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model, _ = make_random_model(args.shape, args.quant, mx.float16)
    prompt = mx.array([list(range(100, 164))])
    for mode in ("reference", "custom"):
        kernels.set_mode(mode)
        for compiled in (False, True):
            decoder = Decoder(model, compiled=compiled)
            decode_rate(model, decoder, prompt, 8)  # warm-up: compile kernels and the trace
            rates = [decode_rate(model, decoder, prompt, args.tokens) for _ in range(3)]
            best = min(rates)
            print(f"{mode:9s} {'compiled' if compiled else 'eager':8s}: {best:6.2f} ms/token = {1e3 / best:7.1f} tok/s",
                  flush=True)
        print(f"{mode:9s} python graph build of one eager step: {build_time(model, prompt):.2f} ms", flush=True)
    kernels.set_mode("auto")


if __name__ == "__main__":
    main()
