"""Batched decode in the engine, without HTTP: correctness of the batched step and throughput of the
scheduler with 8 requests, one after another vs concurrently (batched and interleaved).

    python scripts/make_random_model.py --shape qwen2.5-0.5b --quant q4km --out /tmp/r05
    python benchmarks/batch_bench.py -m /tmp/r05 --tokens 64

Prints the largest logit difference between a batched step and each row alone, the step time per
batch size, and aggregate tok/s of the scheduler (`server/scheduler.py`) per mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

import foundry_mlx as fm  # noqa: E402
from foundry_mlx import kernels  # noqa: E402
from foundry_mlx.engine.batch import merge  # noqa: E402
from foundry_mlx.engine.decoder import decoder_for  # noqa: E402
from foundry_mlx.server.scheduler import Scheduler  # noqa: E402
from foundry_mlx.server.sequence import GenerationRequest  # noqa: E402


def prompts(count: int, vocab: int) -> list[list[int]]:
    return [[(17 * i + 31 * j) % (vocab - 1) + 1 for j in range(8 + 5 * i)] for i in range(count)]


def step_check(model, ids_list) -> None:
    caches = []
    for ids in ids_list:
        cache = model.make_cache()
        mx.eval(model(mx.array(ids)[None], cache))
        caches.append(cache)
    batch = merge(caches)
    tokens = [5 + i for i in range(len(ids_list))]
    batched = model(mx.array(tokens)[:, None], batch, last_only=True)[:, -1, :].astype(mx.float32)
    worst, same = 0.0, 0
    for row, ids in enumerate(ids_list):
        alone = model(mx.array(ids + [tokens[row]])[None], last_only=True)[0, -1].astype(mx.float32)
        worst = max(worst, mx.abs(batched[row] - alone).max().item())
        same += int(mx.argmax(batched[row]).item() == mx.argmax(alone).item())
    print(f"batched step vs each row alone: max |logit diff| {worst:.4g}, same argmax {same}/{len(ids_list)}")


def time_steps(model, ids_list, trials: int) -> None:
    decode = decoder_for(model)
    cache = model.make_cache()
    mx.eval(model(mx.array(ids_list[0])[None], cache))
    token = mx.array([5])
    for _ in range(3):
        mx.eval(decode(token, cache))
    start = time.perf_counter()
    for _ in range(trials):
        mx.eval(decode(token, cache))
    single = (time.perf_counter() - start) / trials
    print(f"B=1 compiled step ({kernels.backend_name()}): {single * 1e3:.2f} ms = {1 / single:.0f} tok/s")
    for size in (2, 4, 8):
        caches = []
        for ids in ids_list[:size]:
            c = model.make_cache()
            mx.eval(model(mx.array(ids)[None], c))
            caches.append(c)
        batch = merge(caches, reserve=trials + 8)
        tokens = mx.array([[5]] * size)
        for _ in range(3):
            mx.eval(model(tokens, batch, last_only=True))
        start = time.perf_counter()
        for _ in range(trials):
            mx.eval(model(tokens, batch, last_only=True))
        step = (time.perf_counter() - start) / trials
        print(f"B={size} batched step: {step * 1e3:.2f} ms = {size / step:.0f} tok/s aggregate ({size * single / step:.2f}x B=1)")


def run(scheduler: Scheduler, requests: list[GenerationRequest]) -> tuple[float, list[list[str]]]:
    texts = [[] for _ in requests]
    left = threading.Semaphore(0)

    def collector(index):
        def emit(event):
            texts[index].append(event.text)
            if event.finish_reason is not None:
                left.release()

        return emit

    start = time.perf_counter()
    for index, request in enumerate(requests):
        scheduler.submit(request, collector(index))
    for _ in requests:
        left.acquire()
    return time.perf_counter() - start, ["".join(t) for t in texts]


def scheduler_throughput(model, tokenizer, ids_list, tokens: int, trials: int) -> None:
    requests = [GenerationRequest(ids, tokens, ignore_eos=True) for ids in ids_list]
    total = tokens * len(requests)
    results = {}
    for mode in ("sequential", "interleaved", "batched"):
        scheduler = Scheduler(model, tokenizer, max_batch=len(requests), prompt_cache=None, batched=mode == "batched")
        scheduler.start()
        run(scheduler, requests[:2])  # warm-up (traces, kernels)
        times, texts = [], None
        for _ in range(trials):
            if mode == "sequential":
                pieces = [run(scheduler, [r]) for r in requests]
                times.append(sum(p[0] for p in pieces))
                texts = [p[1][0] for p in pieces]
            else:
                elapsed, texts = run(scheduler, requests)
                times.append(elapsed)
        scheduler.stop()
        results[mode] = texts
        median = statistics.median(times)
        print(f"scheduler, {len(requests)} requests x {tokens} tokens, {mode}: {median:.2f} s = {total / median:.0f} tok/s "
              f"(trials {[round(t, 2) for t in times]}; largest batch {scheduler.max_rows_seen})")
    for mode in ("interleaved", "batched"):
        same = sum(a == b for a, b in zip(results["sequential"], results[mode]))
        print(f"{mode} answers equal to the sequential ones: {same}/{len(requests)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = fm.load(args.model, progress=False)
    print(f"model {args.model}, backend {kernels.backend_name()}, mlx {mx.__version__}")
    ids_list = prompts(8, model.config.vocab_size)
    step_check(model, ids_list)
    time_steps(model, ids_list, trials=20)
    scheduler_throughput(model, tokenizer, ids_list, args.tokens, args.trials)


if __name__ == "__main__":
    main()
