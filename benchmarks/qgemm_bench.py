"""Micro-benchmark: prefill's three routes for quantized products, against `mx.quantized_matmul`.

For every real matrix of Qwen2.5-0.5B and Qwen2.5-7B (fused QKV, o_proj, fused gate/up, down,
lm_head), 4-bit weights in groups of 64 (mlx-lm's default), float16 x of M = 16, 128, 512, 2048
rows, it times MLX's `quantized_matmul`, our quantized GEMM (kernels/qgemm.py) and the dense route
(kernels/qgemm_dense.py: `mx.dequantize` + dense matmul, the dequantization inside every timed
call, as prefill pays it) and prints µs per call, TFLOP/s (2·M·N·K / time) and MLX's time over
each (> 1: that route wins). Weights are cold, as in a prefill, which reads each layer's matrices
once and a model's matrices together far exceed the L2 cache (50 MB on an H200): consecutive calls
cycle through copies of the weight totalling >= `--rotate-mb` (default 512; 0 reuses one copy, which
L2 keeps warm). And each call's x depends on the previous call's output (x + 0·y[0, 0], one (M, K)
element-wise add per call, the same for every route), as a prefill's products depend on each other:
independent calls let MLX run kernels side by side, which hid how little of the GPU a small grid
fills (7B down at M=128: 122 µs in independent calls, 571 µs inside a prefill under Nsight Compute,
`benchmarks/results/h200-ncu-prefill-7b-4bit-0fd4073.txt`). Timing: `calls` such chained calls are
queued and evaluated together (enough for ~20 ms), the median of `--trials` such batches is kept, divided by `calls`; the
routes alternate batch by batch. On CUDA the other plausible tiles (qgemm.CUDA_TILES) are
timed too, so the tile rule can follow the measurements. The first call of each (NVRTC compile, MLX's JIT) is
excluded and reported as warm-up time. A shape that fails to compile or run is reported, not
fatal; past `--budget` seconds the remaining points are skipped (and listed as such).

    python benchmarks/qgemm_bench.py --out benchmarks/results/h200-qgemm [--quick]

Both the output and the markdown end with the `qgemm_table.MEASURED` entries it measured: per
point the fastest route, where it beat MLX by >= 5%, as dict lines ready to paste. There is no
CPU mode (CPU timings say nothing about a GPU's routes): without a GPU backend it exits with 2.
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
from foundry_mlx.kernels import qgemm, qgemm_dense, qgemm_source  # noqa: E402
from foundry_mlx.quant import QuantizedWeight  # noqa: E402

SHAPES = [  # (model, matrix, N, K); the 7B first: the target, measured before any budget cut
    ("7b", "qkv", 3584 + 2 * 512, 3584), ("7b", "o", 3584, 3584), ("7b", "gate_up", 2 * 18944, 3584),
    ("7b", "down", 3584, 18944), ("7b", "lm_head", 152064, 3584),
    ("0.5b", "qkv", 896 + 2 * 128, 896), ("0.5b", "o", 896, 896), ("0.5b", "gate_up", 2 * 4864, 896),
    ("0.5b", "down", 896, 4864), ("0.5b", "lm_head", 151936, 896),
]
ROWS = (16, 128, 512, 2048)
BITS, GROUP = 4, 64
WIN = 1.05  # a route replaces MLX's where MLX takes at least this many times as long
DENSE_BYTES_IN_FLIGHT = 16e9  # cap on the queued calls' transient dense weights and outputs


def quantized(n: int, k: int, seed: int) -> QuantizedWeight:
    dense = mx.random.uniform(-1.0, 1.0, (n, k), key=mx.random.key(seed)) * (3.0 / k) ** 0.5
    w, s, b = mx.quantize(dense, group_size=GROUP, bits=BITS)
    weight = QuantizedWeight(w, s.astype(mx.float16), b.astype(mx.float16), BITS, GROUP)
    mx.eval(weight.weight, weight.scales, weight.biases)
    return weight


def copies(weight: QuantizedWeight, megabytes: float) -> list[QuantizedWeight]:
    """The weight and fresh copies of it, together at least `megabytes` (calls cycle through them
    so each reads its weight from device memory, not from L2)."""
    size = sum(a.nbytes for a in (weight.weight, weight.scales, weight.biases))
    count = max(1, -(-int(megabytes * 1e6) // size))
    result = [weight] + [QuantizedWeight(weight.weight + 0, weight.scales + 0, weight.biases + 0, BITS, GROUP)
                         for _ in range(count - 1)]
    mx.eval([(c.weight, c.scales, c.biases) for c in result])
    return result


def rotating(function, weights: list[QuantizedWeight], x: mx.array):
    """`function(x, weight)` as a no-argument call that takes the next weight copy each time and an
    x that depends on the previous call's output (so the queued calls run one after another)."""
    state = {"i": 0, "y": None}

    def call():
        state["i"] = (state["i"] + 1) % len(weights)
        previous = state["y"]
        x_in = x if previous is None else x + (previous[:1, :1] * 0).astype(x.dtype)
        state["y"] = function(x_in, weights[state["i"]])
        return state["y"]

    return call


def batch_seconds(function, calls: int) -> float:
    mx.synchronize()
    start = time.perf_counter()
    mx.eval([function() for _ in range(calls)])
    mx.synchronize()
    return time.perf_counter() - start


def measure(functions: dict, trials: int, max_calls: dict | None = None) -> dict:
    """Warm-up seconds and median µs per call of each function, batches alternating; `max_calls`
    caps a function's calls per batch (the dense route's queued calls each hold a dense weight)."""
    result = {}
    for label, function in functions.items():
        start = time.perf_counter()
        mx.eval(function())
        mx.synchronize()
        result[f"{label}_warmup_s"] = round(time.perf_counter() - start, 3)
    calls = {}
    for label, function in functions.items():
        single = batch_seconds(function, 3) / 3
        calls[label] = max(1, min(200, (max_calls or {}).get(label, 200), int(0.02 / max(single, 1e-6))))
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


def run_point(backend: str, weights: list[QuantizedWeight], m: int, n: int, k: int, trials: int,
              tiles: bool, splits: tuple[int, ...] = ()) -> dict:
    x = (mx.random.normal((m, k), key=mx.random.key(m)) * 0.5).astype(mx.float16)
    mx.eval(x)

    def stock(x, weight):
        return mx.quantized_matmul(x, weight.weight, weight.scales, weight.biases, transpose=True,
                                   group_size=GROUP, bits=BITS)

    functions = {"ours": rotating(lambda x, w: qgemm.run(backend, x, w), weights, x),
                 "mlx": rotating(stock, weights, x),
                 "dense": rotating(lambda x, w: qgemm_dense.run(x, w), weights, x)}
    chosen = qgemm.tile(backend, m, n)
    split = qgemm.split_k(backend, m, n, k, chosen)
    if split > 1:  # what split-K buys: the same tile unsplit
        functions["unsplit"] = rotating(lambda x, w: qgemm.run(backend, x, w, split=1), weights, x)
    for factor in splits:  # other split-K factors than split_k's choice, on its tile
        if factor != split and (k // qgemm_source.BK) % factor == 0:
            functions[f"split_{factor}"] = rotating(
                lambda x, w, factor=factor: qgemm.run(backend, x, w, split=factor), weights, x)
    if tiles and backend == "cuda":
        for name, shape in candidate_tiles(m).items():
            if shape != chosen:
                functions[f"tile_{name}"] = rotating(
                    lambda x, w, shape=shape: qgemm.run(backend, x, w, tile_shape=shape), weights, x)
    b = stock(x, weights[0]).astype(mx.float32)
    errors = {label: (mx.abs(functions[label]().astype(mx.float32) - b).max() / mx.abs(b).max()).item()
              for label in ("ours", "dense")}
    dense_bytes = 2 * (n * k + m * n)
    point = dict(tile="x".join(map(str, chosen[:2])), split=split, max_rel_diff_vs_mlx=round(errors["ours"], 5),
                 dense_max_rel_diff_vs_mlx=round(errors["dense"], 5),
                 **measure(functions, trials, {"dense": int(DENSE_BYTES_IN_FLIGHT // dense_bytes)}))
    flops = 2.0 * m * n * k
    for label in ("ours", "mlx", "dense"):
        point[f"{label}_tflops"] = round(flops / point[f"{label}_us"] / 1e6, 1)
    point["speedup"] = round(point["mlx_us"] / point["ours_us"], 3)
    point["dense_speedup"] = round(point["mlx_us"] / point["dense_us"], 3)
    others = {key[5:-3]: value for key, value in point.items() if key.startswith("tile_") and key.endswith("_us")}
    best = min(others.items(), key=lambda item: item[1], default=(point["tile"], point["ours_us"]))
    point["best_tile"], point["best_tile_us"] = best if best[1] < point["ours_us"] else (point["tile"], point["ours_us"])
    return point


def table_entries(rows: list[dict], backend: str) -> list[str]:
    """`qgemm_table.MEASURED` lines: per point the fastest of MLX, the kernel and dense (a route
    counts only where it agreed with MLX within 2%), where it beat MLX by >= 5%."""
    lines = []
    for r in rows:
        if "error" in r:
            continue
        times = {"mlx": r["mlx_us"]}
        if r["max_rel_diff_vs_mlx"] < 0.02:
            times["kernel"] = r["ours_us"]
        if r["dense_max_rel_diff_vs_mlx"] < 0.02:
            times["dense"] = r["dense_us"]
        route, fastest = min(times.items(), key=lambda item: item[1])
        if route != "mlx" and r["mlx_us"] >= WIN * fastest:
            lines.append(f"(\"{backend}\", {r['m']}, {r['n']}, {r['k']}, {BITS}, {GROUP}): \"{route}\",  "
                         f"# {r['model']} {r['matrix']} {r['mlx_us'] / fastest:.2f}x")
    return lines


def markdown(rows: list[dict], info: dict, seconds: float, entries: list[str], rotate_mb: float) -> str:
    lines = [f"# Prefill routes vs mx.quantized_matmul ({BITS}-bit, group {GROUP}, float16)", "",
             f"{info.get('device')} · mlx {info.get('mlx')} · revision {info.get('git_revision')} · "
             f"{seconds:.0f} s. ours: kernels/qgemm.py on the tile `qgemm.tile` picks; dense: "
             "kernels/qgemm_dense.py, dequantization included. "
             + (f"Weights cold: calls cycle through copies totalling >= {rotate_mb:.0f} MB." if rotate_mb
                else "One weight copy, warm in L2 (--rotate-mb 0)."), "",
             "| model | matrix | N | K | M | tile/split-K | ours µs (unsplit) | MLX µs | dense µs | ours TFLOP/s | MLX TFLOP/s "
             "| dense TFLOP/s | MLX/ours | MLX/dense | best tile (µs) | max rel diff ours / dense |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['matrix']} | {r['n']} | {r['k']} | {r['m']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} |" + " |" * 10)
        else:
            lines.append(f"{head} {r['tile']}/{r.get('split', 1)} | {r['ours_us']} ({r.get('unsplit_us', '-')}) | {r['mlx_us']} | {r['dense_us']} | "
                         f"{r['ours_tflops']} | {r['mlx_tflops']} | {r['dense_tflops']} | {r['speedup']} | "
                         f"{r['dense_speedup']} | {r['best_tile']} ({r['best_tile_us']}) | "
                         f"{r['max_rel_diff_vs_mlx']} / {r['dense_max_rel_diff_vs_mlx']} |")
    lines += ["", f"Entries for kernels/qgemm_table.py (fastest route, faster than MLX by >= {WIN - 1:.0%}):", "",
              "```python", *entries, "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--quick", action="store_true", help="7B shapes at M = 512 and 2048 only")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--budget", type=float, default=200.0, help="seconds; later points are skipped")
    parser.add_argument("--no-tiles", action="store_true", help="time only the tile qgemm.tile picks")
    parser.add_argument("--shapes", help="only these, e.g. 7b:gate_up,0.5b:down (default: all)")
    parser.add_argument("--rows", help="only these M, e.g. 128 (default: 16,128,512,2048)")
    parser.add_argument("--splits", default="", help="also time these split-K factors, e.g. 1,2,4")
    parser.add_argument("--rotate-mb", type=float, default=512.0,
                        help="cycle through weight copies of at least this many MB (0: one warm copy)")
    args = parser.parse_args()
    backend = kernels.gpu_backend()
    if backend is None:
        print("qgemm_bench needs MLX's CUDA or Metal backend; this MLX has neither.")
        return 2
    shapes = [s for s in SHAPES if s[0] == "7b"] if args.quick else SHAPES
    row_counts = (512, 2048) if args.quick else ROWS
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if f"{s[0]}:{s[1]}" in wanted]
    if args.rows:
        row_counts = tuple(int(m) for m in args.rows.split(","))
    splits = tuple(int(f) for f in args.splits.split(",") if f)
    began = time.perf_counter()
    rows = []
    print(f"{'shape':>14s} {'N':>7s} {'K':>6s} {'M':>5s} {'ours µs':>9s} {'MLX µs':>9s} {'dense µs':>9s} "
          f"{'ours TF/s':>9s} {'MLX TF/s':>9s} {'MLX/ours':>8s} {'MLX/dense':>9s}", flush=True)
    for index, (model, matrix, n, k) in enumerate(shapes):
        weights = None
        for m in row_counts:
            row = dict(model=model, matrix=matrix, n=n, k=k, m=m)
            if time.perf_counter() - began > args.budget:
                row["error"] = "skipped (time budget)"
            else:
                try:
                    weights = weights or copies(quantized(n, k, index), args.rotate_mb)
                    row |= run_point(backend, weights, m, n, k, args.trials, not args.no_tiles, splits)
                except Exception as error:  # a shape that fails to compile or run is a result
                    row["error"] = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    traceback.print_exc(limit=2)
            rows.append(row)
            label = f"{model} {matrix}"
            if "error" in row:
                print(f"{label:>14s} {n:7d} {k:6d} {m:5d} {row['error']}", flush=True)
            else:
                print(f"{label:>14s} {n:7d} {k:6d} {m:5d} {row['ours_us']:9.1f} {row['mlx_us']:9.1f} "
                      f"{row['dense_us']:9.1f} {row['ours_tflops']:9.1f} {row['mlx_tflops']:9.1f} "
                      f"{row['speedup']:8.2f} {row['dense_speedup']:9.2f}  "
                      f"{row['tile']}/{row['split']} (unsplit {row.get('unsplit_us', '-')}; "
                      f"best tile {row['best_tile']} {row['best_tile_us']})"
                      + "".join(f" {key[:-3]} {value}" for key, value in row.items()
                                if key.startswith("split_") and key.endswith("_us")), flush=True)
        del weights
    seconds = time.perf_counter() - began
    info = machine_info()
    entries = table_entries(rows, backend)
    print(f"\nqgemm_table.MEASURED entries (fastest route, faster than MLX by >= {WIN - 1:.0%}):")
    print("\n".join(f"    {entry}" for entry in entries) or "    (none)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(dict(machine=info, bits=BITS, group_size=GROUP,
                                                                 rotate_mb=args.rotate_mb,
                                                                 seconds=round(seconds, 1), rows=rows), indent=1))
        Path(f"{args.out}.md").write_text(markdown(rows, info, seconds, entries, args.rotate_mb))
        print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
