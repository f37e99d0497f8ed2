"""Compiling kernels with clang++ and caching the shared libraries.

Each distinct driver source is compiled once into
``$TMPDIR/foundry-metal-sim/<hash>.so`` (override the folder with
``METAL_SIM_CACHE``, the compiler with ``METAL_SIM_CXX``); the hash covers the
compiler, the flags, the shim headers, the runtime and the driver, so editing
any of them rebuilds. Files are written under temporary names and renamed, so
concurrent test processes can share the cache.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM_FILES = ("sim_abi.h", "msl_shim.h", "msl_math.h", "msl_simd.h", "msl_simdgroup_matrix.h", "sim_fp16.h")
# The runtime is a .cpp in content; named .h so package-data ("*.h") ships it.
RUNTIME_FILE = "sim_runtime.h"

BASE_FLAGS = (
    "-std=c++20",
    "-O1",
    "-fPIC",
    "-pthread",
    "-fvisibility=hidden",
    # Metal kernels pun pointer types freely and integers wrap on the GPU.
    "-fno-strict-aliasing",
    "-fwrapv",
    "-Wall",
    # [[kernel]], [[buffer(n)]], [[thread_position_in_grid]]... are unknown to
    # clang. Unused variables are noise: portable prologues declare them.
    "-Wno-unknown-attributes",
    "-Wno-unused-variable",
    "-Wno-unused-but-set-variable",
    "-Werror=return-type",
)


class MetalCompileError(RuntimeError):
    """clang++ rejected the kernel; the message is clang's diagnostics, with
    kernel locations given as ``<kernel name>.metal:LINE:COLUMN`` relative to
    the source that :func:`metal_signature` returns."""


class MetalCompileWarning(UserWarning):
    """clang++ accepted the kernel with warnings (-Wall)."""


@functools.lru_cache(maxsize=1)
def compiler() -> str:
    """Path of clang++, or a RuntimeError that says how to install it."""
    name = os.environ.get("METAL_SIM_CXX", "clang++")
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} not found: the Metal kernel simulator compiles kernels "
            "with clang. Install it with `apt-get install clang`."
        )
    return path


@functools.lru_cache(maxsize=1)
def compiler_flags() -> tuple[str, ...]:
    """BASE_FLAGS plus what this clang needs to pass __fp16 (MSL half) by
    value: clang 14 on x86-64 only allows it behind a cc1 flag."""
    probe = "__fp16 twice(__fp16 x) { return x * 2; }\n"
    for extra in ((), ("-Xclang", "-fallow-half-arguments-and-returns")):
        result = subprocess.run(
            [compiler(), *BASE_FLAGS, *extra, "-x", "c++", "-fsyntax-only", "-"],
            input=probe,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            return (*BASE_FLAGS, *extra)
    raise RuntimeError(
        f"{compiler()} cannot pass __fp16 by value, which the simulator uses for Metal's half:\n{result.stderr}"
    )


def cache_dir() -> Path:
    """Folder holding compiled kernels (created on demand)."""
    folder = Path(os.environ.get("METAL_SIM_CACHE") or Path(tempfile.gettempdir()) / "foundry-metal-sim")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.lru_cache(maxsize=1)
def _toolchain_key() -> bytes:
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in (compiler(), version, *compiler_flags()):
        digest.update(part.encode() + b"\0")
    for file_name in (*SHIM_FILES, RUNTIME_FILE):
        digest.update((HERE / file_name).read_bytes())
    return digest.digest()


def _run_compiler(arguments: list[str], what: str) -> str:
    result = subprocess.run(
        [compiler(), *compiler_flags(), "-I", str(HERE), *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise MetalCompileError(f"{what} failed to compile:\n{result.stderr}")
    return result.stderr


def _publish(temporary: Path, final: Path) -> None:
    os.replace(temporary, final)


def _runtime_object() -> Path:
    key = hashlib.sha256(_toolchain_key() + b"runtime").hexdigest()[:24]
    target = cache_dir() / f"runtime-{key}.o"
    if not target.exists():
        temporary = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        _run_compiler(["-x", "c++", "-c", str(HERE / RUNTIME_FILE), "-o", str(temporary)], "runtime")
        _publish(temporary, target)
    return target


_libraries: dict[Path, ctypes.CDLL] = {}
_lock = threading.Lock()


def load_kernel_library(driver: str, kernel_name: str) -> ctypes.CDLL:
    """Compile (or reuse) ``driver`` and load it; entry points get argtypes."""
    key = hashlib.sha256(_toolchain_key() + driver.encode()).hexdigest()[:32]
    target = cache_dir() / f"{key}.so"
    with _lock:
        if target in _libraries:
            return _libraries[target]
        if not target.exists():
            stem = f"{key}.{os.getpid()}.{threading.get_ident()}"
            source = cache_dir() / f"{stem}.cpp"
            source.write_text(driver)
            temporary = cache_dir() / f"{stem}.so.tmp"
            try:
                diagnostics = _run_compiler(
                    ["-shared", str(source), "-x", "none", str(_runtime_object()), "-o", str(temporary)],
                    f"kernel {kernel_name}",
                )
            finally:
                source.unlink(missing_ok=True)
            if diagnostics.strip():
                warnings.warn(diagnostics, MetalCompileWarning, stacklevel=3)
            _publish(temporary, target)
        library = ctypes.CDLL(str(target))
        library.metal_sim_launch.restype = ctypes.c_int
        library.metal_sim_launch.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_uint64,
            ctypes.c_char_p,
            ctypes.c_int64,
        ]
        library.metal_sim_threadgroup_memory_bytes.restype = ctypes.c_int64
        library.metal_sim_threadgroup_memory_bytes.argtypes = []
        _libraries[target] = library
        return library
