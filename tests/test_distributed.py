"""Tensor- and pipeline-parallel runs of the real model: two processes on 127.0.0.1 (ring backend)
against the single-process run.

Each run starts two ranks of `tests/distributed_worker.py` through `loopback.run_ranks`: a ring
hostfile of two 127.0.0.1 ports and a hard timeout. Float tolerance: the sharded run sums the same
products in another order (the all-reduce adds per-rank partial sums; float32), measured at ~3e-5
on these logits; we allow 1e-3 and check that the greedy choice is not a near tie at that
tolerance, so token equality is meaningful.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from loopback import run_ranks

import foundry_mlx as fm
from foundry_mlx import distributed

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("distributed_worker.py")
PROMPT = "def add(a, b):\n    return"
MAX_TOKENS = 4
LOGIT_TOLERANCE = 1e-3
RUN_TIMEOUT = 240  # seconds for a whole two-rank run (load ~9 s, prefill and 4 tokens ~10 s)


def run_two_ranks(tmp_path: Path, model: Path, parallel: str, ids: list[int]) -> list[dict]:
    command = [sys.executable, str(WORKER), str(model), parallel, str(tmp_path), ",".join(map(str, ids)), str(MAX_TOKENS)]
    finished = run_ranks([command, command], tmp_path, RUN_TIMEOUT)
    for rank, result in enumerate(finished):
        assert result.returncode == 0, f"rank {rank} exited with {result.returncode}:\n{result.stderr[-3000:]}"
    return [dict(np.load(tmp_path / f"rank{rank}.npz")) for rank in range(2)]


@pytest.fixture(scope="module")
def single(qwen):
    """The single-process reference: prompt ids, last-position logits, greedy tokens, weight bytes."""
    model, tokenizer = qwen
    ids = tokenizer.encode(PROMPT)
    logits = np.array(model(mx.array([ids]), last_only=True)[0, -1].astype(mx.float32))
    tokens = [r.token for r in fm.stream_generate(model, tokenizer, ids, max_tokens=MAX_TOKENS, ignore_eos=True)]
    top = np.sort(logits)[-2:]
    assert top[1] - top[0] > 2 * LOGIT_TOLERANCE, "the prompt's first greedy choice is a near tie; pick another"
    return {"ids": ids, "logits": logits, "tokens": tokens, "weight_bytes": distributed.weight_bytes(model)}


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_two_ranks_match_single_process(parallel, single, qwen_gguf_path, tmp_path):
    ranks = run_two_ranks(tmp_path, qwen_gguf_path, parallel, single["ids"])
    for rank, out in enumerate(ranks):
        assert int(out["size"]) == 2
        np.testing.assert_array_equal(out["logits"], ranks[0]["logits"], err_msg=f"rank {rank} disagrees with rank 0")
        assert out["tokens"].tolist() == single["tokens"], f"rank {rank}"
        np.testing.assert_allclose(out["logits"], single["logits"], atol=LOGIT_TOLERANCE, rtol=0)
    held = [int(out["weight_bytes"]) for out in ranks]
    print(f"\n{parallel}: weights per rank {[b / 1e6 for b in held]} MB, single process {single['weight_bytes'] / 1e6} MB")
    # Tensor: every matrix split, only the norms replicated. Pipeline: layers split evenly, the
    # embedding on rank 0 and the (larger, 8-bit) LM head on rank 1.
    share = {"tensor": 0.51, "pipeline": 0.55}[parallel]
    assert max(held) < share * single["weight_bytes"]
