"""Weights copied into device memory after loading (foundry_mlx/device_memory.py).

Off by default; on with FOUNDRY_DEVICE_WEIGHTS=1 where the backend is CUDA. The tests stand a CUDA
backend in for the check (the copy itself is plain MLX, so it runs on the CPU): every weight
replaced by an equal array of the same dtype, shared arrays (tied embeddings) copied once and still
shared, batches flushed on the way.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from foundry_mlx import device_memory
from foundry_mlx.errors import FoundryError


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = mx.array([[-0.0, 1.5], [2.0, -3.0]], dtype=mx.float16)
        self.embed = {"weight": shared}
        self.head = {"weight": shared}
        self.layers = [{"w": mx.arange(6, dtype=mx.uint32).reshape(2, 3)} for _ in range(3)]


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(device_memory.kernels, "gpu_backend", lambda: "cuda")


@pytest.mark.parametrize("backend, value, on", [(None, "1", False), ("metal", "1", False), ("cuda", "1", True),
                                                ("cuda", "", False), ("cuda", "0", False)])
def test_on_only_when_asked_with_cuda(monkeypatch, backend, value, on):
    monkeypatch.setenv(device_memory.SWITCH, value)
    monkeypatch.setattr(device_memory.kernels, "gpu_backend", lambda: backend)
    assert device_memory.enabled() is on


def test_nothing_moves_when_off(monkeypatch, cuda):
    monkeypatch.setenv(device_memory.SWITCH, "0")
    model = Tied()
    before = {name: id(a) for name, a in tree_flatten(model.parameters())}
    assert device_memory.into_device_memory(model) == 0
    assert before == {name: id(a) for name, a in tree_flatten(model.parameters())}


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_switch_rejects_other_values(monkeypatch, cuda, value):
    monkeypatch.setenv(device_memory.SWITCH, value)
    with pytest.raises(FoundryError, match=device_memory.SWITCH):
        device_memory.enabled()


@pytest.mark.parametrize("batch_bytes", [1, 1 << 30])
def test_every_weight_is_replaced_by_an_equal_copy(monkeypatch, cuda, batch_bytes):
    monkeypatch.setenv(device_memory.SWITCH, "1")
    model = Tied()
    before = dict(tree_flatten(model.parameters()))
    moved = device_memory.into_device_memory(model, batch_bytes=batch_bytes)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    # the tied matrix counts once: 2x2 float16 + three 2x3 uint32
    assert moved == 8 + 3 * 24
    for name, array in after.items():
        assert array is not before[name], f"{name} was not copied"
        assert array.dtype == before[name].dtype and mx.array_equal(array, before[name]).item()
    assert after["embed.weight"] is after["head.weight"], "tied weights must stay one array"
    # -0.0 survives the copy (x * 1, not x + 0)
    assert (1 / after["embed.weight"][0, 0].astype(mx.float32)).item() < 0


def test_load_moves_the_weights_it_loaded(monkeypatch, tmp_path):
    """`load` hands every model it builds to into_device_memory (a GGUF here; directories take the
    same exit), and the copies generate the same tokens as the weights loading made."""
    import os

    from tiny_models import write_tiny_model

    import foundry_mlx as fm

    # the switch alone decides here (a stand-in CUDA backend would send generation to CUDA kernels)
    monkeypatch.setattr(device_memory, "enabled", lambda: os.environ.get(device_memory.SWITCH) == "1")
    monkeypatch.setenv(device_memory.SWITCH, "1")
    seen = []
    original = device_memory.into_device_memory
    monkeypatch.setattr(device_memory, "into_device_memory", lambda model: seen.append(original(model)))
    path = tmp_path / "tiny.gguf"
    write_tiny_model(path)
    model, tokenizer = fm.load(str(path), progress=False)
    assert len(seen) == 1 and seen[0] == sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    moved = [r.token for r in fm.stream_generate(model, tokenizer, "hello", max_tokens=4, ignore_eos=True)]
    monkeypatch.setenv(device_memory.SWITCH, "0")
    kept, _ = fm.load(str(path), progress=False)
    assert seen[1] == 0
    assert moved == [r.token for r in fm.stream_generate(kept, tokenizer, "hello", max_tokens=4, ignore_eos=True)]
