"""Where one layer-kernel launch spends its device time: clock marks inside the kernel.

With FOUNDRY_LAYER_TIMING=1 (set here before the kernels are imported) the layer kernel
(kernels/fused_layer.py) records, at the end of each of its five phases and after each grid
barrier, block 0's elapsed clock and the slowest block's. This script launches single layers of
a model at a few depths, reads the marks back and prints, per phase, when block 0 finished its
share, when the slowest block did, and when the barrier let block 0 go: the phase's work, its
imbalance and the barrier's cost, in µs (cycles converted with the clock rate the kernel itself
measured against %globaltimer).

    python benchmarks/layer_timing.py /tmp/random-qwen2.5-0.5b-4bit --depths 0,2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["FOUNDRY_LAYER_TIMING"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

PHASE_NAMES = ("norm+QKV+RoPE+KV write", "attention (split, last share merges)", "o_proj+residual",
               "norm+gate/up+SwiGLU", "down+residual")


def layer_marks(model, depth: int, layers: list[int], trials: int) -> dict:
    from foundry_mlx.engine.decoder import prefilled
    from foundry_mlx.kernels import fused_layer, fused_step, sample

    kernels = fused_step.GpuKernels("cuda", layer_kernel=True)
    kernels.prepare(model)
    prompt = [(31 * i + 7) % 50000 + 10 for i in range(max(depth, 1))]
    cache, _ = prefilled(model, prompt, reserve=len(prompt) + 64)
    state = sample.make_state(len(prompt), 0, 0, 1, 0)
    x = kernels.embed(state, model.embed_tokens.table, model.layers[0].self_attn.norm_weight.dtype)
    mx.eval(x)
    samples = []
    for _ in range(trials + 1):  # the first launch compiles: dropped
        for index in layers:
            layer = model.layers[index]
            _, parts = fused_layer.scratch_buffers(layer.self_attn, layer.mlp, x.dtype)
            fused_layer.reset_scratch(parts)
            out, _, _ = kernels.layer(x, layer.self_attn, layer.mlp, state, cache[index].keys, cache[index].values)
            mx.eval(out)
            _, parts = fused_layer.scratch_buffers(layer.self_attn, layer.mlp, x.dtype)
            samples.append(np.array(mx.view(parts[-2 * fused_layer.MARKS:], mx.uint32)).astype(np.float64))
    marks = np.median(np.stack(samples[len(layers):]), axis=0)
    count = fused_layer.MARKS
    ghz = marks[count - 1] / max(marks[count - 2], 1.0)  # cycles per ns, measured by block 0
    us = lambda cycles: round(float(cycles) / ghz / 1000.0, 2)  # noqa: E731
    phases = []
    for phase, name in enumerate(PHASE_NAMES):
        done, passed = marks[2 * phase], marks[2 * phase + 1]
        slowest = marks[count + 2 * phase]
        phases.append({"phase": name, "block0_done_us": us(done), "slowest_done_us": us(slowest),
                       "barrier_passed_us": us(passed) if phase < len(PHASE_NAMES) - 1 else None})
    return {"depth": depth, "layers": layers, "clock_ghz": round(float(ghz), 3),
            "kernel_us": us(marks[count - 1]), "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory (random weights are fine)")
    parser.add_argument("--depths", default="0,2048")
    parser.add_argument("--layers", default="0,12,23", help="layer indices to launch (medians over them)")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    from foundry_mlx.loader import load

    model, _ = load(args.model)
    layers = [int(i) for i in args.layers.split(",") if int(i) < len(model.layers)]
    for depth in (int(d) for d in args.depths.split(",")):
        result = layer_marks(model, depth, layers, args.trials)
        print(json.dumps(result), flush=True)
        print(f"depth {depth}: one layer {result['kernel_us']} µs (block 0), clock {result['clock_ghz']} GHz")
        previous = 0.0
        for row in result["phases"]:
            barrier = row["barrier_passed_us"]
            print(f"  {row['phase']:40s} block 0 done {row['block0_done_us']:7.2f}  slowest done "
                  f"{row['slowest_done_us']:7.2f}  barrier passed {barrier if barrier is not None else '-':>7}"
                  f"  (phase took {row['block0_done_us'] - previous:6.2f} µs for block 0)")
            previous = barrier if barrier is not None else row["block0_done_us"]


if __name__ == "__main__":
    main()
