"""kernels/cuda_cache.py on a CUDA GPU: MLX loads the entries we write, under the names we compute,
for every kernel a decode launches, and a second process compiles nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import mlx.core as mx
import pytest

from foundry_mlx import kernels
from foundry_mlx.kernels import cuda_cache
from foundry_mlx.kernels.source import KernelSource

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cuda_only():
    if kernels.gpu_backend() != "cuda":
        pytest.skip("the kernel cache is CUDA's (Metal keeps compiled custom kernels itself)")


def test_mlx_loads_the_entry_written_under_the_computed_name():
    # The entry written for this kernel holds a *different* body (+7 instead of +3): if MLX runs
    # +7, it loaded our file, found by the module name computed here.
    name = f"cache_probe_{uuid.uuid4().hex[:10]}"
    source = KernelSource(name, ("x",), ("y",), "  y[thread_id] = x[thread_id] + 3.0f;\n")
    header, body = source.launch_text("cuda")
    inputs = [mx.zeros((32,), mx.float32)]
    function, module, text = cuda_cache.entry(f"{name}_cuda", header, body, ("x",), ("y",), inputs, [], [mx.float32])
    assert "+ 3.0f" in text
    path = cuda_cache.compile_entry(cuda_cache.cache_dir(), module, function, text.replace("+ 3.0f", "+ 7.0f"))
    try:
        kernel = source.build("cuda")
        y = kernel(inputs=inputs, grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
                   output_dtypes=[mx.float32])[0]
        assert y.tolist() == [7.0] * 32
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".txt").unlink(missing_ok=True)


def test_every_decode_kernel_source_is_the_text_mlx_compiles(monkeypatch, capfd):
    # MLX prints the source it builds when asked (verbose=True): each must equal ours, byte for
    # byte, or the module names differ and MLX would compile instead of loading.
    from foundry_mlx.engine.generate import stream_generate
    from foundry_mlx.random_model import make_random_model

    ours: dict[str, str] = {}
    original = cuda_cache.CachedCudaKernel.__call__

    def verbose_call(self, **arguments):
        function, _, text = cuda_cache.entry(self._name, self._header, self._source, self._input_names,
                                             self._output_names, arguments["inputs"], arguments.get("template") or [],
                                             arguments["output_dtypes"])
        ours[function] = text
        return original(self, **arguments, verbose=True)

    monkeypatch.setattr(cuda_cache.CachedCudaKernel, "__call__", verbose_call)
    model, tokenizer = make_random_model("qwen2.5-0.5b", "4bit", mx.float16, seed=3)
    tokens = [r.token for r in stream_generate(model, tokenizer, list(range(100, 140)), max_tokens=4, ignore_eos=True)]
    assert len(tokens) == 4
    printed = dict(re.findall(r"Generated source code for `([^`]+)`:\n```\n(.*?)\n```\n", capfd.readouterr().out,
                              re.DOTALL))
    assert len(printed) >= 3, sorted(printed)
    for function, text in printed.items():
        assert ours.get(function) == text, f"{function}: our rebuilt source differs from MLX's"


_RUN = """
import foundry_mlx as fm
from foundry_mlx.random_model import make_random_model
import mlx.core as mx
model, tokenizer = make_random_model("qwen2.5-0.5b", "4bit", mx.float16, seed=3)
print([r.token for r in fm.stream_generate(model, tokenizer, list(range(100, 140)), max_tokens=6, ignore_eos=True)])
"""


def test_a_second_process_compiles_nothing(tmp_path):
    env = dict(os.environ, MLX_PTX_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))

    def run():
        out = subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "compiled by MLX in this process" not in out.stderr, out.stderr[-3000:]
        return out.stdout.strip().splitlines()[-1]

    first = run()
    ours = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("custom_kernel_foundry_*.ptx")}
    assert len(ours) >= 3, sorted(p.name for p in ours)
    second = run()
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("custom_kernel_foundry_*.ptx")} == ours
