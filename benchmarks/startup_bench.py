"""Time to first token in a fresh process: foundry-mlx vs mlx-lm on the same model directory.

Each run is a new Python process that imports the engine, loads the model and generates one token
from a 16-token prompt; the time is from process start to that token (what a user waits for).
"cold" points MLX_PTX_CACHE_DIR at an empty folder (as on a machine that never ran MLX: MLX's
own kernels are compiled again); "warm" is the second run with the cache the first one filled.
    python benchmarks/startup_bench.py MODEL_DIR [--out benchmarks/results/h200-startup]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

FOUNDRY = """
import time; start = float(__import__('sys').argv[1])
import foundry_mlx as fm
imported = time.time()
model, tokenizer = fm.load(__import__('sys').argv[2], progress=False)
loaded = time.time()
for r in fm.stream_generate(model, tokenizer, list(range(100, 116)), max_tokens=1, ignore_eos=True):
    pass
now = time.time()
print(f"split: import {imported - start:.2f} s, load {loaded - imported:.2f} s, first token {now - loaded:.2f} s")
print(now - start)
"""
MLX_LM = """
import time; start = float(__import__('sys').argv[1])
import mlx.core as mx, mlx_lm
model, tokenizer = mlx_lm.load(__import__('sys').argv[2])
for r in mlx_lm.stream_generate(model, tokenizer, mx.array(list(range(100, 116))), max_tokens=1):
    pass
print(time.time() - start)
"""


def once(script: str, model: str, cache_dir: str) -> float:
    env = dict(os.environ, MLX_PTX_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", script, repr(time.time()), model], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    lines = out.stdout.strip().splitlines()
    for line in lines[:-1]:
        if line.startswith("split:"):
            print("   ", line, flush=True)
    return float(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = {}
    for name, script in (("foundry-mlx", FOUNDRY), ("mlx-lm", MLX_LM)):
        with tempfile.TemporaryDirectory(prefix="mlx-ptx-") as cache:
            cold = once(script, args.model, cache)
            warm = [once(script, args.model, cache) for _ in range(2)]
        rows[name] = {"cold_s": cold, "warm_s": min(warm)}
        print(f"{name:12s} first token after {cold:6.2f} s cold, {min(warm):6.2f} s warm", flush=True)
    if args.out:
        with open(args.out + ".json", "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
