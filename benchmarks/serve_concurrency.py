"""Aggregate throughput of `foundry-mlx serve`: N requests one after another, then all at once.

Start a server first (the prompt cache off, so neither run reuses the other's prompts), e.g.

    foundry-mlx serve -m qwen2.5-coder-0.5b --port 8080 --prompt-cache-bytes 0 --log-level warning
    python benchmarks/serve_concurrency.py --url http://127.0.0.1:8080 --clients 8

At temperature 0 it also reports whether each concurrent answer equals the same request alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = [
    "def add(a, b):", "# Sort a list in Python\n", "The capital of France is", "for i in range(",
    "import numpy as np\n", "SELECT name FROM", "class Stack:\n", "Hello, my name is",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--trials", type=int, default=1, help="alternating (one after another, concurrently) pairs")
    args = parser.parse_args()
    model = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    step = (args.max_tokens - args.min_tokens) / max(args.clients - 1, 1)
    jobs = [(PROMPTS[i % len(PROMPTS)], args.min_tokens + round(i * step)) for i in range(args.clients)]

    def ask(job):
        prompt, tokens = job
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{args.url}/v1/completions", json=body, timeout=3600).json()
        return response["choices"][0]["text"], response["usage"]["completion_tokens"]

    sequential_times, concurrent_times = [], []
    engine = {"one after another": {}, "concurrently": {}}  # the server's engine seconds by kind

    def timed(mode, run):
        seconds = httpx.get(f"{args.url}/health").json().get("engine_seconds", {})
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        for kind, value in httpx.get(f"{args.url}/health").json().get("engine_seconds", {}).items():
            engine[mode][kind] = engine[mode].get(kind, 0.0) + value - seconds.get(kind, 0.0)
        return result, elapsed

    def together_run():
        with ThreadPoolExecutor(args.clients) as pool:
            return list(pool.map(ask, jobs))

    before = httpx.get(f"{args.url}/health").json()
    for _ in range(args.trials):  # alternating, so that a busy spell on a shared machine hits both
        alone, elapsed = timed("one after another", lambda: [ask(job) for job in jobs])
        sequential_times.append(elapsed)
        together, elapsed = timed("concurrently", together_run)
        concurrent_times.append(elapsed)
    after = httpx.get(f"{args.url}/health").json()
    sequential, concurrent = statistics.median(sequential_times), statistics.median(concurrent_times)
    tokens = sum(count for _, count in alone)
    print(f"model {model}, {args.clients} requests, {tokens} generated tokens in all (prompts of "
          f"{min(len(p) for p, _ in jobs)}-{max(len(p) for p, _ in jobs)} characters)")
    print(f"trials (s): one after another {[round(t, 1) for t in sequential_times]}, "
          f"concurrently {[round(t, 1) for t in concurrent_times]}; medians below")
    print(f"one after another: {sequential:.1f} s, {tokens / sequential:.2f} tok/s")
    print(f"concurrently:      {concurrent:.1f} s, {tokens / concurrent:.2f} tok/s "
          f"({sequential / concurrent:.2f}x; largest batch {after['largest_batch']}, "
          f"{after['batched_steps'] - before['batched_steps']} batched steps)")
    for mode, seconds in engine.items():
        if seconds:
            split = ", ".join(f"{kind} {value / args.trials:.3f} s" for kind, value in seconds.items())
            print(f"engine time per trial, {mode}: {split}")
    same = sum(a[0] == b[0] for a, b in zip(alone, together))
    print(f"concurrent answers equal to the same request alone: {same}/{args.clients}")
    for (prompt, _), a, b in zip(jobs, alone, together):
        if a[0] != b[0]:
            print(f"  differs for {prompt!r}: alone {a[0]!r} vs concurrent {b[0]!r}")


if __name__ == "__main__":
    main()
