"""`convert` (formats/mlx_dir.py) and `bench`: mlx-lm runs the very weights foundry-mlx holds."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from tiny_models import TinySpec, write_tiny_model

from foundry_mlx import load, stream_generate
from foundry_mlx.cli import main
from foundry_mlx.formats import mlx_dir


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("convert") / "tiny.gguf"
    # Mixed widths (Q5_0 Q/K beside a Q8_0 V, Q4_K down) exercise per-layer bits and promotion.
    types = {"attn_v": T.Q8_0, "ffn_down": T.Q4_K}
    # head_dim = hidden / heads: mlx-lm's qwen2 derives it so (it ignores a head_dim key).
    write_tiny_model(path, TinySpec(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=256, types=types,
                                    default_type=T.Q5_0))
    return path


def greedy(model, tokenizer, ids, count):
    return [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=count, ignore_eos=True)]


def mlx_lm_greedy(path, ids, count):
    import mlx_lm
    from mlx_lm.generate import stream_generate as lm_stream
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(path))
    tokenizer.eos_token_ids = set()
    return model, [r.token for r in lm_stream(model, tokenizer, mx.array(ids), max_tokens=count, sampler=make_sampler(0.0))]


def test_mlx_lm_loads_the_converted_tiny_model_with_identical_logits(tiny_path, tmp_path):
    model, tokenizer = load(str(tiny_path), progress=False)
    out = mlx_dir.save_directory(model, tokenizer, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 5 and config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 4}
    ids = [3, 14, 15, 92, 65, 35]
    lm_model, lm_tokens = mlx_lm_greedy(out, ids, 8)
    np.testing.assert_allclose(np.array(lm_model(mx.array([ids]))), np.array(model(mx.array([ids]))), atol=1e-5)
    assert lm_tokens == greedy(model, tokenizer, ids, 8)
    reloaded, _ = load(str(out), progress=False)  # foundry-mlx reads its own output back
    np.testing.assert_allclose(np.array(reloaded(mx.array([ids]))), np.array(model(mx.array([ids]))), atol=1e-6)


def test_convert_refuses_a_non_empty_directory_and_force_replaces_it(tiny_path, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(tiny_path), str(target)])
    assert result.exit_code == 1 and "not empty" in result.output and "--force" in result.output
    assert (target / "keep.txt").read_text() == "mine"
    result = runner.invoke(main, ["convert", str(tiny_path), str(target), "--force"])
    assert result.exit_code == 0, result.output
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch or old copy left behind


def test_an_interrupted_convert_leaves_nothing(tiny_path, tmp_path, monkeypatch):
    model, tokenizer = load(str(tiny_path), progress=False)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", fail)
    with pytest.raises(KeyboardInterrupt):
        mlx_dir.save_directory(model, tokenizer, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bench_runs_both_engines_and_writes_its_files(tiny_path, tmp_path):
    prefix = tmp_path / "results" / "tiny-0.5b"  # a dot in the name must survive
    result = CliRunner().invoke(main, ["bench", "-m", str(tiny_path), "--prompt-lengths", "8,16", "--depths", "0,16",
                                       "--decode-tokens", "4", "--trials", "2", "--out", str(prefix)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results" / "tiny-0.5b.json").read_text())
    engines = {r["engine"] for r in data["results"]}
    assert engines == {"foundry-mlx (reference)", "mlx-lm"}
    for record in data["results"]:
        assert len(record["tokens_per_second"]) == 2 and all(t > 0 for t in record["tokens_per_second"])
    assert {(r["kind"], r["length"]) for r in data["results"]} == {("prefill", 8), ("prefill", 16), ("decode", 0),
                                                                     ("decode", 16)}
    table = (tmp_path / "results" / "tiny-0.5b.md").read_text()
    assert "| prefill 8 tokens |" in table and "ratio" in table and data["meta"]["weight_bytes_per_token"] > 0


@pytest.mark.slow
def test_mlx_lm_generates_our_greedy_tokens_on_the_real_model(qwen, tmp_path):
    """The issue's bar: `mlx_lm.load(convert output)` gives the same greedy tokens as our reference path."""
    model, tokenizer = qwen
    out = mlx_dir.save_directory(model, tokenizer, tmp_path / "qwen-mlx", progress=False)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Say hello in French."}]),
                           add_special_tokens=False)
    _, lm_tokens = mlx_lm_greedy(out, ids, 12)
    assert lm_tokens == greedy(model, tokenizer, ids, 12)
