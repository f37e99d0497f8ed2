"""Host time per MLX graph node on CUDA, by kind of node: what a short prefill of a small model costs.

    python benchmarks/node_costs.py [--nodes 200] [--trials 15]

A chain of `--nodes` nodes of one kind is built, then launched with `mx.async_eval` (which returns
once every node is issued: the host's share) and waited for. Kinds: a custom kernel of a few lines
(`mx.fast.cuda_kernel`), the same kernel with a 16 KB source (MLX hashes the whole source at each
launch: mlx/backend/cuda/custom_kernel.cpp), MLX's own add, and reshape/transpose pairs (views, no
kernel), our prefill GEMM and MLX's attention at the 0.5B's shapes. Medians over `--trials` after a warm-up, per node, in µs. CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

_BODY = """
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < x_shape[0]) y[i] = x[i] + static_cast<T>(1);
"""


def _kernel(source_bytes: int):
    padding = "// " + "x" * max(source_bytes - 4, 0) + "\n" if source_bytes else ""
    return mx.fast.cuda_kernel(name=f"node_cost_{source_bytes}", input_names=["x"], output_names=["y"],
                               source=_BODY, header=padding)


def _chain(kind: str, x: mx.array, nodes: int) -> mx.array:
    if kind.startswith("custom kernel"):
        kernel = _kernel(16384 if "16 KB" in kind else 0)
        for _ in range(nodes):
            x = kernel(inputs=[x], template=[("T", x.dtype)], grid=(x.size, 1, 1), threadgroup=(256, 1, 1),
                       output_shapes=[x.shape], output_dtypes=[x.dtype])[0]
        return x
    if kind.startswith("sdpa"):  # the 0.5B's prefill attention at 128 tokens: 14 query heads, 2 kv, 64 wide
        q = mx.zeros((1, 14, 128, 64), dtype=x.dtype) + x[:1]
        kv = mx.zeros((1, 2, 128, 64), dtype=x.dtype)
        mx.eval(q, kv)
        for _ in range(nodes):
            q = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.125, mask="causal")
        return q
    if kind.startswith("our GEMM"):  # the 0.5B's o_proj at 128 rows, unsplit: its 14 KB source
        from foundry_mlx import quant
        from foundry_mlx.kernels import qgemm

        h = mx.zeros((128, 896), dtype=x.dtype) + x[:1]
        w, scales, biases = mx.quantize(mx.zeros((896, 896), dtype=x.dtype), group_size=64, bits=4)
        weight = quant.QuantizedWeight(w, scales, biases, 4, 64)
        mx.eval(h, w, scales, biases)
        for _ in range(nodes):
            h = qgemm.run("cuda", h, weight, split=1)
        return h
    if kind == "mlx add":
        for _ in range(nodes):
            x = x + 1
        return x
    for _ in range(nodes // 2):  # reshape + transpose: two view nodes
        x = x.reshape(16, -1).T.reshape(-1)
    return x + 0  # the last view materialized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args()
    print(f"mlx {mx.__version__}, {mx.default_device()}, chains of {args.nodes} nodes, µs per node (median)")
    print(f"{'kind':28s} {'build':>8s} {'launch':>8s} {'wait':>8s}")
    for kind in ("custom kernel", "custom kernel, 16 KB source", "our GEMM (896x896, M=128)", "sdpa (0.5B, 128 causal)",
                 "mlx add", "reshape + transpose"):
        times: dict[str, list[float]] = {"build": [], "launch": [], "wait": []}
        for trial in range(args.trials + 1):
            x = mx.zeros((1024,), dtype=mx.float16)
            mx.eval(x)
            a = time.perf_counter()
            y = _chain(kind, x, args.nodes)
            b = time.perf_counter()
            mx.async_eval(y)
            c = time.perf_counter()
            mx.eval(y)
            d = time.perf_counter()
            if trial:
                for label, value in zip(times, (b - a, c - b, d - c)):
                    times[label].append(value * 1e6 / args.nodes)
        print(f"{kind:28s} " + " ".join(f"{statistics.median(v):8.2f}" for v in times.values()))


if __name__ == "__main__":
    main()
