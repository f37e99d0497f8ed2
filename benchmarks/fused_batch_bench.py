"""The batched fused decode step (engine/batch_decoder.py) without HTTP: time per step and aggregate
tok/s for B rows, against the single-sequence fused step, and each step's graph nodes.

    python scripts/make_random_model.py --shape qwen2.5-0.5b --quant 4bit --out /tmp/r05
    python benchmarks/fused_batch_bench.py -m /tmp/r05 --steps 200

Steps are queued one ahead of the token read, as the server's scheduler runs them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

import foundry_mlx as fm  # noqa: E402
from foundry_mlx.engine.batch_decoder import batch_decoder_for  # noqa: E402
from foundry_mlx.engine.decoder import fused_decoder_for, graph_nodes, prefilled  # noqa: E402
from foundry_mlx.engine.sampling import SamplingParams  # noqa: E402


def pipelined(advance, steps: int) -> float:
    """Seconds per step with one step queued ahead of the one being read."""
    queued = advance()
    mx.async_eval(queued)
    start = time.perf_counter()
    for _ in range(steps):
        following = advance()
        mx.async_eval(following)
        queued.tolist()
        queued = following
    queued.tolist()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", default="1,2,4,8")
    args = parser.parse_args()
    model, _ = fm.load(args.model, progress=False)
    prompt = [(31 * j) % 5000 + 10 for j in range(64)]
    single = fused_decoder_for(model)
    if single is None:
        sys.exit("the fused step does not run here (no CUDA, or FOUNDRY_FUSED=0)")
    cache, logits = prefilled(model, prompt, 64 + 2 * args.steps + 64)
    single.start(cache, logits, SamplingParams(), prompt, 0)
    pipelined(single.advance, 10)
    base = pipelined(single.advance, args.steps)
    print(f"single-sequence fused step: {base * 1e3:.3f} ms/step = {1 / base:.0f} tok/s")
    for rows in (int(r) for r in args.rows.split(",")):
        batch = batch_decoder_for(model)
        for row in range(rows):
            cache, _ = prefilled(model, prompt[: 64 - 3 * row], 64)
            batch.join(row, cache, 100 + row, prompt, SamplingParams(), row, room=2 * args.steps + 64)
        pipelined(batch.advance, 10)
        nodes = graph_nodes(batch.advance(), batch.state)
        step = pipelined(batch.advance, args.steps)
        print(f"batched fused step, {rows} rows ({len(batch.rows)} slots, {nodes} graph nodes): {step * 1e3:.3f} ms/step"
              f" = {rows / step:.0f} tok/s aggregate ({rows * base / step:.2f}x the single step)")


if __name__ == "__main__":
    main()
