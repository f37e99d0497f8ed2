"""Sharding plans without processes: each rank's part of every weight, put back together, is the
whole weight (GGUF blocks cut mid-block included); plans refuse shapes that do not split."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import llama_quantized_spec, qwen2_quantized_spec, write_tiny_model

from foundry_mlx import quant
from foundry_mlx.config import ModelConfig
from foundry_mlx.errors import FoundryError
from foundry_mlx.formats.gguf import GGUFFile
from foundry_mlx.formats.gguf_model import read_config, read_weights
from foundry_mlx.formats.mlx_dir import load_directory, save_directory
from foundry_mlx.loader import load
from foundry_mlx.pipeline_parallel import PipelinePlan
from foundry_mlx.tensor_parallel import TensorPlan


def _dense(weight) -> np.ndarray:
    return np.array(quant.dequantize(weight).astype(mx.float32))


def _reassemble(plan_class, name: str, parts: list) -> np.ndarray:
    plan = plan_class
    if plan.columns(name) is not None:
        return np.concatenate([_dense(p) for p in parts], axis=1)
    if plan.rows(name) is not None:
        return np.concatenate([_dense(p) for p in parts], axis=0)
    return _dense(parts[0])


@pytest.mark.parametrize("spec", [qwen2_quantized_spec(), llama_quantized_spec(tied=True)], ids=["qwen2", "llama"])
def test_tensor_shards_reassemble_to_the_whole(tmp_path, spec):
    tiny = write_tiny_model(tmp_path / "tiny.gguf", spec)
    gguf = GGUFFile(tiny.path)
    config = read_config(gguf)
    whole = read_weights(gguf, config, mx.float32, progress=False)
    plans = [TensorPlan(config, rank, 2) for rank in range(2)]
    shards = [read_weights(gguf, config, mx.float32, progress=False, shard=plan) for plan in plans]
    # ffn_down (Q4_K / Q5_K, 256-value blocks) is cut at column 128: inside a block.
    assert plans[0].columns("model.layers.0.mlp.down_proj.weight") == (0, 128)
    for name, weight in whole.items():
        parts = [shard[name] for shard in shards]
        if name.endswith(("o_proj.bias", "down_proj.bias")):
            continue
        if plans[0].rows(name) == plans[1].rows(name) and plans[0].rows(name) is not None:  # replicated KV
            continue
        np.testing.assert_array_equal(_reassemble(plans[0], name, parts), _dense(weight), err_msg=name)
    # Each rank holds its share: about half of every split matrix.
    q_rows = config.num_attention_heads * config.head_dim
    assert shards[1]["model.layers.0.self_attn.q_proj.weight"].shape[0] == q_rows // 2


def test_directory_shards_equal_gguf_shards(tmp_path):
    """A safetensors directory sharded lazily gives each rank the same weights as the GGUF path."""
    tiny = write_tiny_model(tmp_path / "tiny.gguf", qwen2_quantized_spec())
    model, tokenizer = load(str(tiny.path), progress=False)
    save_directory(model, tokenizer, tmp_path / "dir", progress=False)
    gguf = GGUFFile(tiny.path)
    config = read_config(gguf)
    for rank in range(2):
        plan = TensorPlan(config, rank, 2)
        from_gguf = plan.build(config, read_weights(gguf, config, mx.float32, progress=False, shard=plan))
        from_dir, _ = load_directory(tmp_path / "dir", mx.float32, progress=False,
                                     make_plan=lambda c, r=rank: TensorPlan(c, r, 2))
        for a, b in zip(from_gguf.layers, from_dir.layers):
            np.testing.assert_array_equal(_dense(a.self_attn.qkv_proj.quantized), _dense(b.self_attn.qkv_proj.quantized))
            np.testing.assert_array_equal(_dense(a.mlp.down_proj.quantized), _dense(b.mlp.down_proj.quantized))
        assert from_dir.config.num_attention_heads == config.num_attention_heads  # the whole model's config


def _config(**overrides) -> ModelConfig:
    values = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                  num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936)
    return ModelConfig(**{**values, **overrides})


def test_kv_heads_split_or_replicate():
    split = [TensorPlan(_config(num_attention_heads=28, num_key_value_heads=4), r, 2) for r in range(2)]
    assert [(p.heads, p.kv_heads, p.kv_start) for p in split] == [(14, 2, 0), (14, 2, 2)]
    # 8 ranks, 4 KV heads (Qwen2.5-7B-like on 8 GPUs, 32 query heads): each KV head on two ranks.
    replicated = [TensorPlan(_config(num_attention_heads=32, num_key_value_heads=4, intermediate_size=18944 * 2), r, 8)
                  for r in range(8)]
    assert [p.kv_start for p in replicated] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(p.kv_heads == 1 for p in replicated)


@pytest.mark.parametrize("size, message", [(4, "attention heads"), (3, "attention heads")])
def test_tensor_plan_refuses_uneven_splits(size, message):
    with pytest.raises(FoundryError, match=message):
        TensorPlan(_config(), 0, size)


def test_pipeline_layers_are_contiguous_and_cover_the_model():
    plans = [PipelinePlan(_config(), rank, 5) for rank in range(5)]
    layers = [i for plan in plans for i in plan.layers]
    assert layers == list(range(24))
    assert [len(plan.layers) for plan in plans] == [5, 5, 5, 5, 4]
    assert plans[0].keeps("model.embed_tokens.weight") and not plans[4].keeps("model.embed_tokens.weight")
    assert plans[4].keeps("lm_head.weight") and not plans[0].keeps("model.norm.weight")
    assert PipelinePlan(_config(tie_word_embeddings=True), 4, 5).keeps("model.embed_tokens.weight")
    with pytest.raises(FoundryError, match="without a layer"):
        PipelinePlan(_config(num_hidden_layers=2), 0, 3)


def test_planner_refuses_families_without_hooks():
    from foundry_mlx.distributed import planner

    class Group:
        def rank(self):
            return 0

        def size(self):
            return 2

    with pytest.raises(FoundryError, match="does not support 'gemma3'"):
        planner(Group(), "tensor")(_config(model_type="gemma3"))
    assert isinstance(planner(Group(), "pipeline")(_config()), PipelinePlan)
    with pytest.raises(FoundryError, match="Unknown parallelism"):
        planner(Group(), "expert")
