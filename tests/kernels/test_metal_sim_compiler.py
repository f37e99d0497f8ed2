"""Tests of the Metal kernel simulator itself (foundry_mlx.kernels.metal_sim): finding a C++20 compiler.

Each test pins one behaviour that kernel tests rely on, with a kernel that gives
a different answer if the simulator gets that behaviour wrong.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from foundry_mlx.kernels.metal_sim import build

pytestmark = pytest.mark.filterwarnings("ignore::foundry_mlx.kernels.metal_sim.MetalCompileWarning")


# -------------------------------------------------------------- compiler --
@pytest.fixture
def fresh_compiler(monkeypatch):
    """build.compiler() found afresh under the test's environment, and again after it."""
    for variable in ("FOUNDRY_CXX", "METAL_SIM_CXX", "ZIG_GLOBAL_CACHE_DIR", "ZIG_LOCAL_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    build.compiler.cache_clear()
    yield build.compiler
    build.compiler.cache_clear()


def test_compiler_is_found_and_takes_half_arguments() -> None:
    # Without a compiler every simulator test fails (never skips) with the
    # same one-line fix; this one names the problem first.
    print(f"metal_sim compiler: {build.compiler().description}")
    assert build.compiler_flags()[0] == "-std=c++20"


def _fake_compiler(folder, name: str, version: str) -> None:
    script = folder / name
    script.write_text(f"#!/bin/sh\necho '{version}'\n")
    script.chmod(0o755)


def test_clang_on_the_path_comes_before_ziglang(fresh_compiler, monkeypatch, tmp_path) -> None:
    _fake_compiler(tmp_path, "clang++", "fake clang version 99")
    monkeypatch.setenv("PATH", str(tmp_path))
    found = fresh_compiler()
    assert found.command == (str(tmp_path / "clang++"),)
    assert "fake clang version 99" in found.description


def test_foundry_cxx_overrides_the_path(fresh_compiler, monkeypatch, tmp_path) -> None:
    _fake_compiler(tmp_path, "clang++", "fake clang version 99")
    _fake_compiler(tmp_path, "my-zig", "fake zig clang")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("FOUNDRY_CXX", "my-zig c++")
    found = fresh_compiler()
    assert found.command == (str(tmp_path / "my-zig"), "c++")
    assert set(found.environment) == {"ZIG_GLOBAL_CACHE_DIR", "ZIG_LOCAL_CACHE_DIR"}


def test_without_clang_the_ziglang_package_is_used(fresh_compiler, monkeypatch, tmp_path) -> None:
    if importlib.util.find_spec("ziglang") is None:
        pytest.fail('ziglang is missing: pip install -e ".[test]" installs it')
    monkeypatch.setenv("PATH", str(tmp_path))
    found = fresh_compiler()
    assert found.command[-1] == "c++" and found.description.startswith("zig c++")
    assert Path(found.environment["ZIG_GLOBAL_CACHE_DIR"]).parent == build.cache_dir()


def test_no_compiler_is_an_error_that_says_how_to_get_one(fresh_compiler, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(build, "_zig_compiler", lambda: None)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[test\]"'):
        fresh_compiler()
    monkeypatch.setenv("FOUNDRY_CXX", "no-such-clang++")
    with pytest.raises(RuntimeError, match="no-such-clang.. .from FOUNDRY_CXX. not found"):
        fresh_compiler()
