"""Micro-benchmark: our quantized GEMM (kernels/qgemm.py) against `mx.quantized_matmul`, prefill shapes.

For every real matrix of Qwen2.5-0.5B and Qwen2.5-7B (fused QKV, o_proj, fused gate/up, down,
lm_head), 4-bit weights in groups of 64 (mlx-lm's default), float16 x of M = 16, 128, 512, 2048
rows, it times both and prints µs per call, TFLOP/s (2·M·N·K / time) and MLX's time over ours
(> 1: the kernel wins). Timing: `calls` independent calls are queued and evaluated together
(enough for ~20 ms), the median of `--trials` such batches is kept, divided by `calls`; the two
implementations alternate batch by batch. On CUDA the other plausible tiles (qgemm.CUDA_TILES) are
timed too, so the tile rule can follow the measurements. The first call of each (NVRTC compile, MLX's JIT) is
excluded and reported as warm-up time. A shape that fails to compile or run is reported, not
fatal; past `--budget` seconds the remaining points are skipped (and listed as such).

    python benchmarks/qgemm_bench.py --out benchmarks/results/h200-qgemm [--quick]

The markdown ends with the `qgemm_table.MEASURED` entries where the kernel won by more than 5%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from foundry_mlx import kernels  # noqa: E402
from foundry_mlx.bench import machine_info  # noqa: E402
from foundry_mlx.kernels import qgemm  # noqa: E402
from foundry_mlx.quant import QuantizedWeight  # noqa: E402

SHAPES = [  # (model, matrix, N, K); the 7B first: the target, measured before any budget cut
    ("7b", "qkv", 3584 + 2 * 512, 3584), ("7b", "o", 3584, 3584), ("7b", "gate_up", 2 * 18944, 3584),
    ("7b", "down", 3584, 18944), ("7b", "lm_head", 152064, 3584),
    ("0.5b", "qkv", 896 + 2 * 128, 896), ("0.5b", "o", 896, 896), ("0.5b", "gate_up", 2 * 4864, 896),
    ("0.5b", "down", 896, 4864), ("0.5b", "lm_head", 151936, 896),
]
ROWS = (16, 128, 512, 2048)
BITS, GROUP = 4, 64
WIN = 1.05


def quantized(n: int, k: int, seed: int) -> QuantizedWeight:
    dense = mx.random.uniform(-1.0, 1.0, (n, k), key=mx.random.key(seed)) * (3.0 / k) ** 0.5
    w, s, b = mx.quantize(dense, group_size=GROUP, bits=BITS)
    weight = QuantizedWeight(w, s.astype(mx.float16), b.astype(mx.float16), BITS, GROUP)
    mx.eval(weight.weight, weight.scales, weight.biases)
    return weight


def batch_seconds(function, calls: int) -> float:
    mx.synchronize()
    start = time.perf_counter()
    mx.eval([function() for _ in range(calls)])
    mx.synchronize()
    return time.perf_counter() - start


def measure(functions: dict, trials: int) -> dict:
    """Warm-up seconds and median µs per call of each function, batches alternating."""
    result = {}
    for label, function in functions.items():
        start = time.perf_counter()
        mx.eval(function())
        mx.synchronize()
        result[f"{label}_warmup_s"] = round(time.perf_counter() - start, 3)
    calls = {}
    for label, function in functions.items():
        single = batch_seconds(function, 3) / 3
        calls[label] = max(1, min(200, int(0.02 / max(single, 1e-6))))
    samples: dict[str, list[float]] = {label: [] for label in functions}
    for _ in range(trials):
        for label, function in functions.items():
            samples[label].append(batch_seconds(function, calls[label]) / calls[label])
    for label in functions:
        result[f"{label}_us"] = round(statistics.median(samples[label]) * 1e6, 2)
    return result


def candidate_tiles(m: int) -> dict:
    """The CUDA tiles worth timing at this M besides the one `qgemm.tile` picks."""
    return {name: shape for name, shape in qgemm.CUDA_TILES.items() if min(m, 128) / 2 <= shape[0] <= max(m, 16)}


def run_point(backend: str, weight: QuantizedWeight, m: int, n: int, k: int, trials: int, tiles: bool) -> dict:
    x = (mx.random.normal((m, k), key=mx.random.key(m)) * 0.5).astype(mx.float16)
    mx.eval(x)

    def stock():
        return mx.quantized_matmul(x, weight.weight, weight.scales, weight.biases, transpose=True,
                                   group_size=GROUP, bits=BITS)

    functions = {"ours": lambda: qgemm.run(backend, x, weight), "mlx": stock}
    chosen = qgemm.tile(backend, m, n)
    if tiles and backend == "cuda":
        for name, shape in candidate_tiles(m).items():
            if shape != chosen:
                functions[f"tile_{name}"] = lambda shape=shape: qgemm.run(backend, x, weight, tile_shape=shape)
    a, b = functions["ours"](), stock()
    error = (mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max() / mx.abs(b.astype(mx.float32)).max()).item()
    point = dict(tile="x".join(map(str, chosen[:2])), max_rel_diff_vs_mlx=round(error, 5),
                 **measure(functions, trials))
    flops = 2.0 * m * n * k
    point["ours_tflops"] = round(flops / point["ours_us"] / 1e6, 1)
    point["mlx_tflops"] = round(flops / point["mlx_us"] / 1e6, 1)
    point["speedup"] = round(point["mlx_us"] / point["ours_us"], 3)
    others = {key[5:-3]: value for key, value in point.items() if key.startswith("tile_") and key.endswith("_us")}
    best = min(others.items(), key=lambda item: item[1], default=(point["tile"], point["ours_us"]))
    point["best_tile"], point["best_tile_us"] = best if best[1] < point["ours_us"] else (point["tile"], point["ours_us"])
    return point


def markdown(rows: list[dict], info: dict, seconds: float) -> str:
    lines = [f"# Quantized GEMM vs mx.quantized_matmul ({BITS}-bit, group {GROUP}, float16)", "",
             f"{info.get('device')} · mlx {info.get('mlx')} · revision {info.get('git_revision')} · "
             f"{seconds:.0f} s", "",
             "| model | matrix | N | K | M | tile | ours µs | MLX µs | ours TFLOP/s | MLX TFLOP/s | MLX/ours "
             "| best tile (µs) | max rel diff |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['matrix']} | {r['n']} | {r['k']} | {r['m']} |"
        if "error" in r:
            lines.append(f"{head} | {r['error']} | | | | | | |")
        else:
            lines.append(f"{head} {r['tile']} | {r['ours_us']} | {r['mlx_us']} | {r['ours_tflops']} | "
                         f"{r['mlx_tflops']} | {r['speedup']} | {r['best_tile']} ({r['best_tile_us']}) | "
                         f"{r['max_rel_diff_vs_mlx']} |")
    wins = [r for r in rows if r.get("speedup", 0) > WIN and r.get("max_rel_diff_vs_mlx", 1) < 0.02]
    lines += ["", f"Entries for kernels/qgemm_table.py (kernel faster by > {WIN - 1:.0%}):", "", "```python"]
    lines += [f"(\"{info.get('backend')}\", {r['m']}, {r['n']}, {r['k']}, {BITS}, {GROUP}): True,  "
              f"# {r['speedup']}x" for r in wins]
    lines.append("```")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--quick", action="store_true", help="7B shapes at M = 512 and 2048 only")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--budget", type=float, default=200.0, help="seconds; later points are skipped")
    parser.add_argument("--no-tiles", action="store_true", help="time only the tile qgemm.tile picks")
    args = parser.parse_args()
    backend = kernels.gpu_backend()
    if backend is None:
        print("qgemm_bench needs MLX's CUDA or Metal backend; this MLX has neither.")
        return 2
    shapes = [s for s in SHAPES if s[0] == "7b"] if args.quick else SHAPES
    row_counts = (512, 2048) if args.quick else ROWS
    began = time.perf_counter()
    rows = []
    print(f"{'shape':>14s} {'N':>7s} {'K':>6s} {'M':>5s} {'ours µs':>9s} {'MLX µs':>9s} {'ours TF/s':>9s} "
          f"{'MLX TF/s':>9s} {'MLX/ours':>8s}", flush=True)
    for index, (model, matrix, n, k) in enumerate(shapes):
        weight = None
        for m in row_counts:
            row = dict(model=model, matrix=matrix, n=n, k=k, m=m)
            if time.perf_counter() - began > args.budget:
                row["error"] = "skipped (time budget)"
            else:
                try:
                    weight = weight or quantized(n, k, index)
                    row |= run_point(backend, weight, m, n, k, args.trials, not args.no_tiles)
                except Exception as error:  # a shape that fails to compile or run is a result
                    row["error"] = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    traceback.print_exc(limit=2)
            rows.append(row)
            label = f"{model} {matrix}"
            if "error" in row:
                print(f"{label:>14s} {n:7d} {k:6d} {m:5d} {row['error']}", flush=True)
            else:
                print(f"{label:>14s} {n:7d} {k:6d} {m:5d} {row['ours_us']:9.1f} {row['mlx_us']:9.1f} "
                      f"{row['ours_tflops']:9.1f} {row['mlx_tflops']:9.1f} {row['speedup']:8.2f}  "
                      f"{row['tile']} (best {row['best_tile']} {row['best_tile_us']})", flush=True)
        del weight
    seconds = time.perf_counter() - began
    info = machine_info()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(dict(machine=info, bits=BITS, group_size=GROUP,
                                                                 seconds=round(seconds, 1), rows=rows), indent=1))
        Path(f"{args.out}.md").write_text(markdown(rows, info, seconds))
        print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
