"""One rank of a distributed run, for tests/test_distributed.py (not a test module).

    python tests/distributed_worker.py MODEL tensor|pipeline OUT_DIR PROMPT_IDS MAX_TOKENS

Joins the group from MLX_RANK / MLX_HOSTFILE (ring backend), loads MODEL sharded, and writes
OUT_DIR/rank{r}.npz: the last-position logits of the prompt, the greedy tokens after it, and the
bytes of weights this rank holds.
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
import numpy as np

import foundry_mlx as fm
from foundry_mlx import distributed


def main() -> None:
    model_path, parallel, out_dir, prompt, max_tokens = sys.argv[1:6]
    group = distributed.init("ring")
    ids = [int(i) for i in prompt.split(",")]
    start = time.perf_counter()
    model, tokenizer = fm.load(model_path, progress=False, group=group, parallel=parallel)
    load_seconds = time.perf_counter() - start
    logits = model(mx.array([ids]), last_only=True)[0, -1].astype(mx.float32)
    tokens = [r.token for r in fm.stream_generate(model, tokenizer, ids, max_tokens=int(max_tokens), ignore_eos=True)]
    np.savez(
        f"{out_dir}/rank{group.rank()}.npz",
        logits=np.array(logits),
        tokens=np.array(tokens),
        weight_bytes=distributed.weight_bytes(model),
        active_bytes=mx.get_active_memory(),
        size=group.size(),
        load_seconds=load_seconds,
    )


if __name__ == "__main__":
    main()
