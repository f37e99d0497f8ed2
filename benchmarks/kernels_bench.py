"""Micro-benchmarks: each decode kernel against the stock MLX ops it replaces, same inputs, one run.

For every real Qwen2.5-0.5B shape (and the 7B's) it times one call of our fused kernel and of the
MLX path mlx-lm takes for the same math (e.g. `mx.fast.rms_norm` + `mx.quantized_matmul` + bias +
two `mx.fast.rope`), and prints time per call, achieved GB/s (weight + scale/bias bytes read per
call / time) and the ratio. Timing: 200 independent calls are queued and evaluated together, the
best of 7 such batches is kept, divided by 200 (launch cost included, host sync amortised).

    python benchmarks/kernels_bench.py --out benchmarks/results/h100-kernels
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from foundry_mlx import kernels  # noqa: E402
from foundry_mlx.bench import machine_info  # noqa: E402
from foundry_mlx.kernels import qgemv, qgemv_launch  # noqa: E402
from foundry_mlx.kernels.decode import KernelSet  # noqa: E402
from foundry_mlx.quant import QuantizedWeight  # noqa: E402

CALLS, BATCHES = 200, 7


def time_per_call(function) -> float:
    mx.eval(function())  # compile / warm
    best = float("inf")
    for _ in range(BATCHES):
        start = time.perf_counter()
        mx.eval([function() for _ in range(CALLS)])
        best = min(best, time.perf_counter() - start)
    return best / CALLS


def quantized(rows: int, columns: int, bits: int, group: int, dtype, seed: int) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    dense = mx.array(rng.standard_normal((rows, columns)).astype(np.float32) / np.sqrt(columns))
    w, s, b = mx.quantize(dense, group_size=group, bits=bits)
    return QuantizedWeight(w, s.astype(dtype), b.astype(dtype), bits, group)


def qmm(x, weight: QuantizedWeight):
    return mx.quantized_matmul(x, weight.weight, weight.scales, weight.biases, transpose=True,
                               group_size=weight.group_size, bits=weight.bits)


def stock(name: str, kwargs: dict, parts: dict):
    """The MLX path mlx-lm runs for the same computation (separate projections where it has them)."""
    x = kwargs["x"].reshape(1, 1, -1)
    if name.startswith("qkv"):
        head_dim = kwargs["head_dim"]

        def run():
            h = mx.fast.rms_norm(x, kwargs["norm_weight"], kwargs["eps"])
            q = qmm(h, parts["q"]) + kwargs["bias"][: parts["q"].shape[0]]
            k = qmm(h, parts["k"]) + kwargs["bias"][parts["q"].shape[0] : parts["q"].shape[0] + parts["k"].shape[0]]
            v = qmm(h, parts["v"]) + kwargs["bias"][parts["q"].shape[0] + parts["k"].shape[0] :]
            q = mx.fast.rope(q.reshape(1, 1, -1, head_dim).transpose(0, 2, 1, 3), head_dim, traditional=False,
                             base=1e6, scale=1.0, offset=kwargs["position"])
            k = mx.fast.rope(k.reshape(1, 1, -1, head_dim).transpose(0, 2, 1, 3), head_dim, traditional=False,
                             base=1e6, scale=1.0, offset=kwargs["position"])
            return q, k, v
        return run
    if name.startswith("gate_up"):
        def run():
            h = mx.fast.rms_norm(x, kwargs["norm_weight"], kwargs["eps"])
            gate, up = qmm(h, parts["gate"]), qmm(h, parts["up"])
            return gate * mx.sigmoid(gate) * up
        return run
    if name.startswith("lm_head"):
        return lambda: qmm(mx.fast.rms_norm(x, kwargs["norm_weight"], kwargs["eps"]), kwargs["weight"])
    if "residual" in name:
        return lambda: kwargs["residual"] + qmm(x, kwargs["weight"])
    return lambda: qmm(x, kwargs["weight"])


def cases(dtype):
    """(name, variant, kwargs, separate parts for the stock path)."""
    rng = np.random.default_rng(0)

    def vector(n, scale=1.0):
        return mx.array(rng.standard_normal(n).astype(np.float32) * scale).astype(dtype)

    out = []
    for hidden, heads, kv, ffn, vocab, tag, low, down_bits in (
        (896, 14, 2, 4864, 151936, "0.5b", 5, 4),
        (3584, 28, 4, 18944, 152064, "7b", 4, 4),
    ):
        head_dim = hidden // heads
        q = quantized(heads * head_dim, hidden, 8, 32, dtype, 1)
        k = quantized(kv * head_dim, hidden, 8, 32, dtype, 2)
        v = quantized(kv * head_dim, hidden, 8, 32, dtype, 3)
        fused = QuantizedWeight(*(mx.concatenate([getattr(p, a) for p in (q, k, v)]) for a in ("weight", "scales", "biases")), 8, 32)
        freqs = 1e6 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
        out.append((f"qkv+norm+rope {tag} {hidden}->{fused.shape[0]} b8", qgemv.Variant(norm=True, bias=True, rope=True),
                    dict(x=vector(hidden), weight=fused, norm_weight=vector(hidden), eps=1e-6,
                         bias=vector(fused.shape[0], 0.1), inv_freq=mx.array(1 / freqs), position=1000,
                         rope_rows=(heads + kv) * head_dim, head_dim=head_dim), {"q": q, "k": k, "v": v}))
        gate = quantized(ffn, hidden, low, 32, dtype, 4)
        up = quantized(ffn, hidden, low, 32, dtype, 5)
        gate_up = QuantizedWeight(*(mx.concatenate([getattr(p, a) for p in (gate, up)]) for a in ("weight", "scales", "biases")), low, 32)
        out.append((f"gate_up+norm+swiglu {tag} {hidden}->2x{ffn} b{low}", qgemv.Variant(norm=True, swiglu=True),
                    dict(x=vector(hidden), weight=gate_up, norm_weight=vector(hidden), eps=1e-6), {"gate": gate, "up": up}))
        for bits in (down_bits, 8):
            out.append((f"down+residual {tag} {ffn}->{hidden} b{bits}", qgemv.Variant(residual=True),
                        dict(x=vector(ffn), weight=quantized(hidden, ffn, bits, 32, dtype, 6), residual=vector(hidden)), {}))
        out.append((f"o_proj+residual {tag} {hidden}->{hidden} b{low}", qgemv.Variant(residual=True),
                    dict(x=vector(hidden), weight=quantized(hidden, hidden, low, 32, dtype, 7), residual=vector(hidden)), {}))
        out.append((f"lm_head+norm {tag} {hidden}->{vocab} b8", qgemv.Variant(norm=True),
                    dict(x=vector(hidden), weight=quantized(vocab, hidden, 8, 32, dtype, 8), norm_weight=vector(hidden), eps=1e-6), {}))
        for bits, group in ((4, 64), (5, 32), (6, 32), (8, 32)) if tag == "0.5b" else ():
            out.append((f"plain {tag} {hidden}->{vocab} b{bits} g{group}", qgemv.Variant(),
                        dict(x=vector(hidden), weight=quantized(vocab, hidden, bits, group, dtype, 9)), {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    backend = kernels.gpu_backend()
    if backend is None:
        sys.exit("needs MLX's Metal or CUDA backend")
    dtype = getattr(mx, args.dtype)
    kernel_set = KernelSet(backend)
    rows = []
    for name, variant, kwargs, parts in cases(dtype):
        weight = kwargs["weight"]
        launch = qgemv_launch.launch(variant, **kwargs)
        ours = time_per_call(lambda variant=variant, launch=launch: kernel_set._run(variant, launch))
        theirs = time_per_call(stock(name, kwargs, parts))
        gbytes = weight.nbytes / 1e9
        rows.append({"kernel": name, "ours_us": ours * 1e6, "stock_us": theirs * 1e6, "ours_gb_s": gbytes / ours,
                     "stock_gb_s": gbytes / theirs, "speedup": theirs / ours, "weight_mb": weight.nbytes / 1e6})
        r = rows[-1]
        print(f"{name:48s} ours {r['ours_us']:8.1f} us {r['ours_gb_s']:7.0f} GB/s | stock {r['stock_us']:8.1f} us "
              f"{r['stock_gb_s']:7.0f} GB/s | {r['speedup']:.2f}x", flush=True)
    if args.out:
        meta = {**machine_info(), "dtype": args.dtype, "command": "python " + " ".join(sys.argv)}
        (args.out.parent / f"{args.out.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        lines = [f"# {args.out.name}", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [
            "", "| kernel | ours µs | ours GB/s | stock MLX µs | stock GB/s | speed-up |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['ours_us']:.1f} | {r['ours_gb_s']:.0f} | {r['stock_us']:.1f} | "
                  f"{r['stock_gb_s']:.0f} | {r['speedup']:.2f}× |" for r in rows]
        (args.out.parent / f"{args.out.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
