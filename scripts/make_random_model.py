"""Write a random-weight model of a real architecture's exact shape as an MLX model directory.

Both engines load it (`foundry-mlx bench -m DIR`, `mlx_lm.load(DIR)`), so machines that cannot
download the real weights still benchmark the real shapes and bit mixes:

    python scripts/make_random_model.py --shape qwen2.5-0.5b --quant q4km --out /tmp/rand-0.5b-q4km
    python scripts/make_random_model.py --shape qwen2.5-7b --quant 4bit --out /tmp/rand-7b-4bit

Shapes: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b. Quantizations: q4km (GGUF Q4_K_M's mix as
foundry-mlx loads it), 4bit and 8bit (uniform, groups of 64, mlx-lm's defaults), fp16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from foundry_mlx.formats.mlx_dir import save_directory  # noqa: E402
from foundry_mlx.random_model import QUANTS, SHAPES, make_random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--quant", choices=QUANTS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args()
    model, tokenizer = make_random_model(args.shape, args.quant, getattr(mx, args.dtype), args.seed)
    save_directory(model, tokenizer, args.out, force=args.force)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
