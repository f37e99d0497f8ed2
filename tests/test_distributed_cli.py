"""The command line across two processes on 127.0.0.1 (ring backend), on a tiny model: rank 0
prints what a single process prints and rank 1 nothing; a rank that fails or never joins stops
the other with one clear line instead of a hang."""

from __future__ import annotations

import subprocess
import sys

import pytest
from loopback import ROOT, run_ranks
from tiny_models import TinySpec, llama_quantized_spec, write_tiny_model

TIMEOUT = 120
CLI = [sys.executable, "-m", "foundry_mlx"]


SHAPE = dict(hidden=128, heads=8, head_dim=16, layers=4, ffn=256)  # splits over 2 ranks on groups of 32
SPECS = {
    # dense float32, 4 KV heads: KV heads split 2 + 2
    "qwen2-gqa": TinySpec(kv_heads=4, seed=5, **SHAPE),
    # quantized (Q5_K ffn_down cut mid-block), Q/K rows permuted by the converter, tied head, one KV
    # head: replicated on both ranks
    "llama-mqa": llama_quantized_spec(kv_heads=1, tied=True, **SHAPE),
}


@pytest.fixture(scope="module", params=list(SPECS))
def any_tiny_path(request, tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp(request.param) / "tiny.gguf", SPECS[request.param]).path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", SPECS["qwen2-gqa"]).path


def _single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "1.0", "--seed", "7"]], ids=["greedy", "seeded"])
def test_rank_zero_prints_what_one_process_prints(any_tiny_path, tmp_path, parallel, sampling):
    args = ["generate", "-m", str(any_tiny_path), "-p", "hello world", "-n", "12", "--json", *sampling]
    single = _single(args)
    assert single.returncode == 0, single.stderr
    ranks = run_ranks([CLI + args + ["--distributed", parallel]] * 2, tmp_path, TIMEOUT)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    import json

    expected, got = json.loads(single.stdout), json.loads(ranks[0].stdout)
    assert got["text"] == expected["text"] and got["generation_tokens"] == expected["generation_tokens"]
    assert ranks[1].stdout == ""


def test_a_rank_that_fails_stops_the_other(tiny_path, tmp_path):
    args = ["generate", "-p", "hello", "-n", "4", "--distributed", "tensor"]
    ranks = run_ranks([CLI + args + ["-m", str(tiny_path)], CLI + args + ["-m", str(tmp_path / "missing.gguf")]],
                      tmp_path, TIMEOUT)
    assert ranks[1].returncode == 1 and "error:" in ranks[1].stderr
    assert ranks[0].returncode == 1
    assert "error: rank 0: another rank stopped" in ranks[0].stderr
    assert "Traceback" not in ranks[0].stderr


def test_a_rank_that_never_joins_times_out(tiny_path, tmp_path):
    args = ["generate", "-m", str(tiny_path), "-p", "hello", "-n", "4", "--distributed", "tensor",
            "--distributed-timeout", "3"]
    ranks = run_ranks([CLI + args], tmp_path, TIMEOUT, size=2)  # rank 1 of 2 is never started
    assert ranks[0].returncode != 0
    assert "error: no other rank joined within 3 s" in ranks[0].stderr


def test_distributed_without_a_launcher_is_a_clear_error(tiny_path):
    result = _single(["generate", "-m", str(tiny_path), "-p", "hello", "--distributed", "pipeline"])
    assert result.returncode == 1
    assert "--distributed needs several processes; start them with mlx.launch" in result.stderr
