"""The benchmark's arithmetic: prefill FLOPs from a model's config, and the table's rate column."""

from __future__ import annotations

import pytest
from tiny_models import write_tiny_model

import foundry_mlx as fm
from foundry_mlx import bench
from foundry_mlx.layers import Linear


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.gguf"
    write_tiny_model(path)
    return fm.load(str(path), progress=False)[0]


def test_prefill_flops_counts_every_projection_once_per_token(tiny):
    """Against the model's own matrices: every Linear under `layers` (in x out each), twice per
    token; plus causal attention, plus the LM head once."""
    config = tiny.config
    matrices = sum(module.in_features * module.out_features
                   for layer in tiny.layers for _, module in layer.named_modules() if isinstance(module, Linear))
    assert matrices > 0
    head = 2 * config.hidden_size * config.vocab_size
    for length in (1, 7, 64):
        attention = 2 * 2 * config.num_attention_heads * config.head_dim * length * (length + 1) / 2
        expected = config.num_hidden_layers * attention + 2 * matrices * length + head
        assert bench.prefill_flops(config, length) == pytest.approx(expected)


def test_prefill_rows_report_tflops_and_decode_rows_bandwidth():
    prefill = bench.Measurement("a", "prefill", 128, [1000.0], [0.128], [0.1], [5.0], [12.5])
    decode = bench.Measurement("a", "decode", 0, [300.0], [0.01], [0.1], [450.0])
    text = bench.table([prefill, decode])
    assert "| prefill 128 tokens | 1000.0 [1000.0] | 12.5 TFLOP/s |" in text
    assert "| decode @ depth 0 | 300.0 [300.0] | 450.0 |" in text


def test_run_records_tflops_for_prefill_only():
    """A stand-in engine whose first token comes after a known time."""
    import time

    def stream(ids, max_tokens):
        for _ in range(max_tokens):
            time.sleep(0.002)
            yield None

    engine = bench.Engine("stand-in", None, stream, 1000, 10, flops=lambda length: 1e9 * length)
    config = bench.BenchConfig(prompt_lengths=(8,), depths=(0,), decode_tokens=2, trials=1, clear_cache=False)
    results = {m.kind: m for m in bench.run([engine], config, vocab_size=100, log=lambda line: None)}
    (tflops,) = results["prefill"].tflops
    (ttft,) = results["prefill"].time_to_first_token
    assert tflops == pytest.approx(8e9 / ttft / 1e12)
    assert results["decode"].tflops == []


@pytest.mark.parametrize("back_to_back", [False, True])
def test_back_to_back_precedes_each_timed_run_with_the_same_request(back_to_back):
    """Engines alternate by trial either way; with back_to_back each timed run (the ones recorded)
    follows an untimed run of the same engine and prompt length."""
    calls = []

    def engine(name):
        def stream(ids, max_tokens):
            calls.append((name, len(ids), max_tokens))
            yield from [None] * max_tokens
        return bench.Engine(name, None, stream, 1000, 10)

    config = bench.BenchConfig(prompt_lengths=(8,), depths=(0,), decode_tokens=2, trials=2, clear_cache=False,
                               back_to_back=back_to_back)
    results = bench.run([engine("a"), engine("b")], config, vocab_size=100, log=lambda line: None)
    assert {(m.engine, m.kind): len(m.tokens_per_second) for m in results} == {
        ("a", "prefill"): 2, ("a", "decode"): 2, ("b", "prefill"): 2, ("b", "decode"): 2}
    timed = calls[4:]  # after the warm-up: a's prefill and decode, then b's
    one_trial = [("a", 8, 1), ("a", 1, 3), ("b", 8, 1), ("b", 1, 3)]
    if back_to_back:
        one_trial = [run for run in one_trial for _ in range(2)]
    assert timed == one_trial * 2
