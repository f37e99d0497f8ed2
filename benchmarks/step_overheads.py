"""Where the fused decode step's time goes on the GPU machine: host work vs device work.

Two measurements, each printed as one JSON line (run it once per MLX setting: MLX reads
MLX_USE_CUDA_GRAPHS / MLX_MAX_OPS_PER_BUFFER when it starts):

* `step`: a random-weight model decodes greedily through the fused step (kernels/fused_step.py).
  `host_us` is the Python + MLX time to queue one step (`advance` + `mx.async_eval`), `wall_us`
  the time per token with every step queued ahead and read once at the end. `wall_us` close to
  `host_us` means the host sets the speed; well above it, the device does.
  `idle_*`: one step queued on an idle device: building it (`idle_call_us`), queueing it
  (`idle_host_us`, both), then waiting for its token (`idle_wait_us`).
* `chain`: N trivial custom kernels in one compiled function, with a short source and with the
  same source padded to the size of the fused step's kernels: host µs per node, and whether the
  source's length costs anything (MLX hashes each kernel's whole source at every launch).

    python benchmarks/step_overheads.py /tmp/random-qwen2.5-0.5b-4bit --depths 0,2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def step_times(model, depth: int, tokens: int, trials: int) -> dict:
    from foundry_mlx.engine.decoder import fused_decoder_for
    from foundry_mlx.engine.sampling import SamplingParams

    fused = fused_decoder_for(model)
    if fused is None:
        return {"error": "the fused step does not run here"}
    walls, hosts, idle, calls, waits = [], [], [], [], []
    for _ in range(trials + 1):  # the first trial compiles and warms up
        cache = model.make_cache()
        for layer_cache in cache:
            layer_cache.reserve(depth + tokens + 20)
        prompt = mx.array([[(7 * i) % 1000 + 1 for i in range(depth + 1)]])
        logits = model(prompt, cache, last_only=True)[:, -1, :]
        token = fused.start(cache, logits, SamplingParams(), [], 0)
        mx.eval(token, fused.state, [c.keys for c in cache])
        host = 0.0
        start = time.perf_counter()
        for _ in range(tokens):
            queued = time.perf_counter()
            token = fused.advance()
            mx.async_eval(token)
            host += time.perf_counter() - queued
        token.item()
        walls.append((time.perf_counter() - start) / tokens * 1e6)
        hosts.append(host / tokens * 1e6)
        # Host time of a step queued on an idle device: no back-pressure from MLX's in-flight limit.
        for _ in range(16):
            queued = time.perf_counter()
            token = fused.advance()
            built = time.perf_counter()
            mx.async_eval(token)
            done = time.perf_counter()
            idle.append((done - queued) * 1e6)
            calls.append((built - queued) * 1e6)
            token.item()
            waits.append((time.perf_counter() - done) * 1e6)
    return {"depth": depth, "wall_us": round(_median(walls[1:]), 1), "host_us": round(_median(hosts[1:]), 1),
            "idle_host_us": round(_median(idle[16:]), 1), "idle_call_us": round(_median(calls[16:]), 1),
            "idle_wait_us": round(_median(waits[16:]), 1), "tok_s": round(1e6 / _median(walls[1:]), 1)}


def chain_times(nodes: int, padding: int, extra_inputs: int = 0, extra_outputs: int = 0, trials: int = 20) -> dict:
    """N kernels in a chain; each also takes `extra_inputs` 1 MB buffers and writes `extra_outputs`
    small ones (the layer kernel takes 20 inputs and writes 6 outputs)."""
    body = "unsigned int i = threadIdx.x + blockIdx.x * blockDim.x; if (i < 256) out[i] = x[i] + 1.0f;"
    header = "// " + "x" * padding + "\n" if padding else ""
    inputs = ["x"] + [f"in{i}" for i in range(extra_inputs)]
    outputs = ["out"] + [f"out{i}" for i in range(extra_outputs)]
    kernel = mx.fast.cuda_kernel(name=f"chain_{padding}_{extra_inputs}_{extra_outputs}", input_names=inputs,
                                 output_names=outputs, source=body, header=header)
    buffers = [mx.zeros((1 << 18,)) for _ in range(extra_inputs)]

    def chain(x):
        for _ in range(nodes):
            x = kernel(inputs=[x, *buffers], grid=(256, 1, 1), threadgroup=(256, 1, 1),
                       output_shapes=[(256,)] * len(outputs), output_dtypes=[mx.float32] * len(outputs))[0]
        return x

    step = mx.compile(chain)
    x = mx.zeros((256,))
    mx.eval(step(x))
    hosts, walls = [], []
    for _ in range(trials):
        start = time.perf_counter()
        y = step(x)
        mx.async_eval(y)
        queued = time.perf_counter()
        mx.eval(y)
        hosts.append((queued - start) / nodes * 1e6)
        walls.append((time.perf_counter() - start) / nodes * 1e6)
    return {"nodes": nodes, "padding": padding, "extra_inputs": extra_inputs, "extra_outputs": extra_outputs,
            "host_us_per_node": round(_median(hosts), 2),
            "wall_us_per_node": round(_median(walls), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory (random weights are fine)")
    parser.add_argument("--depths", default="0,2048")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--chain", action="store_true", help="also time chains of trivial kernels")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    setting = {key: os.environ[key] for key in sorted(os.environ) if key.startswith(("MLX_", "FOUNDRY_"))}
    if args.model:
        from foundry_mlx.loader import load

        model, _ = load(args.model)
        for depth in (int(d) for d in args.depths.split(",")):
            print(json.dumps({"label": args.label, "kind": "step", **setting,
                              **step_times(model, depth, args.tokens, args.trials)}), flush=True)
    if args.chain:
        for nodes, padding, extra_inputs, extra_outputs in ((120, 0, 0, 0), (120, 8000, 0, 0), (27, 28000, 0, 0),
                                                              (27, 0, 20, 0), (27, 0, 0, 6), (27, 28000, 20, 6)):
            print(json.dumps({"label": args.label, "kind": "chain", **setting,
                              **chain_times(nodes, padding, extra_inputs, extra_outputs)}), flush=True)


if __name__ == "__main__":
    main()
