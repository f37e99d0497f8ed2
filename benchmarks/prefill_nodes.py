"""What a compiled prefill's graph is made of: its primitives by name and count (one trace, no
segments), where host time per node goes (~2 µs to build, ~4 µs to launch each on CUDA).

    python benchmarks/prefill_nodes.py /tmp/random-qwen2.5-0.5b-4bit --length 128
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

import foundry_mlx as fm  # noqa: E402
from foundry_mlx.engine import prefill as prefilling  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    os.environ[prefilling.SEGMENTS_SWITCH] = "1"
    os.environ[prefilling.SWITCH] = "1"  # the compiled prefill, as on CUDA by default
    model, _ = fm.load(args.path, progress=False)
    cache = model.make_cache()
    logits = prefilling.prefill(model, [(37 * i + 11) % 1000 for i in range(args.length)], cache)
    with tempfile.NamedTemporaryFile(suffix=".dot") as handle:
        mx.export_to_dot(handle.name, logits, *[c.keys for c in cache], *[c.values for c in cache])
        text = handle.read().decode()
    names = [label.split()[0] for label in re.findall(r'label\s*=\s*"?([^"\]]+)"?[^\]]*shape=rectangle', text)]
    print(f"{args.path}, {args.length} tokens, {len(model.layers)} layers: {len(names)} nodes, "
          f"{len(names) / len(model.layers):.1f} a layer")
    for name, count in collections.Counter(names).most_common():
        print(f"{count:6d}  {name}")


if __name__ == "__main__":
    main()
