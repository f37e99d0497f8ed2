"""Prefill and decode speed of one model on one process or sharded over a group, and its tokens.

    python benchmarks/distributed_bench.py --model DIR --out single.json
    mlx.launch --backend nccl -n 2 -- python benchmarks/distributed_bench.py --model DIR --parallel tensor --out tp.json
    python benchmarks/distributed_bench.py --compare single.json tp.json pp.json     # a Markdown table

Every rank runs the same random prompt (fixed seed) with greedy decoding, EOS ignored: one warm-up
run, then `--trials` timed runs; rank 0 writes the medians, the greedy tokens and each rank's weight
bytes. `--compare` checks that every run produced the first file's tokens and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import foundry_mlx as fm  # noqa: E402
from foundry_mlx import distributed, kernels  # noqa: E402


def measure(args: argparse.Namespace) -> None:
    group = mx.distributed.init() if args.parallel != "none" else None
    size = group.size() if group is not None else 1
    start = time.perf_counter()
    model, tokenizer = fm.load(args.model, progress=False, group=group, parallel=args.parallel if size > 1 else "tensor")
    load_seconds = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, args.prompt_tokens).tolist()
    runs = []
    for trial in range(args.trials + 1):  # the first is the warm-up (kernel compilation, allocation)
        responses = list(fm.stream_generate(model, tokenizer, ids, max_tokens=args.decode_tokens, ignore_eos=True))
        if trial:
            runs.append(responses)
    tokens = [r.token for r in runs[-1]]
    held = mx.array([distributed.weight_bytes(model)], dtype=mx.float32)
    per_rank = mx.distributed.all_gather(held, group=group) if size > 1 else held
    result = {
        "parallel": args.parallel if size > 1 else "none",
        "ranks": size,
        "device": str(mx.default_device()),
        "kernels": kernels.backend_name(),
        "model": str(args.model),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "prefill_tps": statistics.median(r[-1].prompt_tps for r in runs),
        "decode_tps": statistics.median(r[-1].generation_tps for r in runs),
        "load_seconds": load_seconds,
        "weight_gb_per_rank": [round(float(b) / 1e9, 3) for b in np.array(per_rank)],
        "peak_memory_gb": runs[-1][-1].peak_memory_gb,
        "tokens": tokens,
    }
    if group is None or group.rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "tokens"}))


def compare(paths: list[str]) -> int:
    results = [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]
    missing = [p for p in paths if not Path(p).exists()]
    base = results[0]
    print("| run | ranks | kernels | prefill tok/s | decode tok/s | weights GB per rank | same tokens |")
    print("|---|---|---|---|---|---|---|")
    agree = True
    for r in results:
        same = r["tokens"] == base["tokens"]
        agree &= same
        print(f"| {r['parallel']} | {r['ranks']} | {r['kernels']} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
              f"{r['weight_gb_per_rank']} | {'yes' if same else 'NO'} |")
    for p in missing:
        print(f"| {p}: no result (that run failed; see its log) | | | | | | |")
    return 0 if agree and not missing else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--parallel", choices=["none", "tensor", "pipeline"], default="none")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", default="distributed-bench.json")
    parser.add_argument("--compare", nargs="+", help="result files: print the table, exit 1 if tokens differ")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(args.compare))
    measure(args)


if __name__ == "__main__":
    main()
