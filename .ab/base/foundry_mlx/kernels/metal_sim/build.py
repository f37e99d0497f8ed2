"""Compiling kernels with a C++20 clang and caching the shared libraries.

Which compiler (:func:`compiler`), first match wins:

1. ``FOUNDRY_CXX``: a command line, e.g. ``clang++-18`` or
   ``python -m ziglang c++`` (``METAL_SIM_CXX``, the older name, also works);
2. ``clang++`` on the PATH (macOS and most developer machines have one);
3. the clang inside the ``ziglang`` package (``zig c++``, with its own libc++),
   which ``pip install -e ".[test]"`` installs, so the tests need nothing but
   Python.

It has to be clang: the shim passes Metal's ``half`` as ``__fp16``, which g++
lacks on x86-64. zig's caches (with the libc++ it builds on first use) go in
``<cache>/zig`` unless ``ZIG_GLOBAL_CACHE_DIR`` / ``ZIG_LOCAL_CACHE_DIR`` are set.

Each distinct driver source is compiled once into
``$TMPDIR/foundry-metal-sim/<hash>.so`` (override the folder with
``METAL_SIM_CACHE``); the hash covers the compiler, the flags, the shim
headers, the runtime and the driver, so editing any of them rebuilds. Files are
written under temporary names and renamed, so concurrent test processes can
share the cache.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
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
    """clang rejected the kernel; the message is clang's diagnostics, with
    kernel locations given as ``<kernel name>.metal:LINE:COLUMN`` relative to
    the source that :func:`metal_signature` returns."""


class MetalCompileWarning(UserWarning):
    """clang accepted the kernel with warnings (-Wall)."""


INSTALL_HINT = 'install the test extra (`pip install -e ".[test]"`, which brings ziglang) or put clang++ on the PATH'


@dataclass(frozen=True)
class Compiler:
    """A C++20 clang: the command that runs it, the environment it needs, and
    a one-line description for test reports."""

    command: tuple[str, ...]
    description: str
    environment: dict[str, str] = field(default_factory=dict)

    def run(self, arguments: list[str], **options) -> subprocess.CompletedProcess:
        environment = {**os.environ, **self.environment} if self.environment else None
        return subprocess.run([*self.command, *arguments], env=environment, check=False, **options)


def _version_line(command: list[str], environment: dict[str, str] | None = None) -> str:
    try:
        result = subprocess.run(
            [*command, "--version"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **environment} if environment else None,
        )
    except OSError as error:
        raise RuntimeError(f"{shlex.join(command)} cannot run ({error}); {INSTALL_HINT}.") from None
    lines = result.stdout.strip().splitlines()
    return lines[0] if lines else "unknown version"


def _zig_environment() -> dict[str, str]:
    # zig caches in ~/.cache/zig by default; HOME may be read-only or absent (CI,
    # sandboxes), so keep its caches beside ours unless the user chose a place.
    folder = cache_dir() / "zig"
    return {name: os.environ.get(name) or str(folder) for name in ("ZIG_GLOBAL_CACHE_DIR", "ZIG_LOCAL_CACHE_DIR")}


def _zig_compiler() -> Compiler | None:
    spec = importlib.util.find_spec("ziglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    zig = Path(next(iter(spec.submodule_search_locations))) / "zig"
    if not os.access(zig, os.X_OK):
        return None
    environment = _zig_environment()
    zig_version = subprocess.run(
        [str(zig), "version"], capture_output=True, text=True, check=False, env={**os.environ, **environment}
    ).stdout.strip()
    clang_version = _version_line([str(zig), "c++"], environment)
    return Compiler((str(zig), "c++"), f"zig c++ {zig_version} ({clang_version}; ziglang package, {zig})", environment)


def _command_compiler(command: list[str], origin: str) -> Compiler:
    path = shutil.which(command[0])
    if path is None:
        raise RuntimeError(f"{command[0]} (from {origin}) not found: set {origin} to an installed clang, or unset it.")
    command = [os.path.abspath(path), *command[1:]]
    environment = _zig_environment() if "zig" in Path(path).name or "ziglang" in command else {}
    return Compiler(tuple(command), f"{shlex.join(command)} ({_version_line(command, environment)})", environment)


@functools.lru_cache(maxsize=1)
def compiler() -> Compiler:
    """The C++20 clang that compiles kernels (see the module docstring for the
    order), or a RuntimeError that says how to get one."""
    for variable in ("FOUNDRY_CXX", "METAL_SIM_CXX"):
        if os.environ.get(variable, "").strip():
            return _command_compiler(shlex.split(os.environ[variable]), variable)
    if shutil.which("clang++"):
        return _command_compiler(["clang++"], "PATH")
    zig = _zig_compiler()
    if zig is not None:
        return zig
    raise RuntimeError(f"No C++ compiler for the Metal kernel simulator: {INSTALL_HINT}.")


@functools.lru_cache(maxsize=1)
def compiler_flags() -> tuple[str, ...]:
    """BASE_FLAGS plus what this clang needs to pass __fp16 (MSL half) by
    value: on x86-64 clang only allows it behind a cc1 flag, whose name
    changed (clang 14: -fallow-…; zig's clang 22 knows only -fnative-…)."""
    probe = "__fp16 twice(__fp16 x) { return x * 2; }\n"
    candidates = (
        (),
        ("-Xclang", "-fallow-half-arguments-and-returns"),
        ("-Xclang", "-fnative-half-arguments-and-returns"),
    )
    # A real object file, not -fsyntax-only: zig c++ fails on that (it still
    # tries to move an output it never wrote into its cache).
    with tempfile.TemporaryDirectory(dir=cache_dir()) as folder:
        source = Path(folder) / "probe.cpp"
        source.write_text(probe)
        for extra in candidates:
            result = compiler().run(
                [*BASE_FLAGS, *extra, "-c", str(source), "-o", str(Path(folder) / "probe.o")],
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                return (*BASE_FLAGS, *extra)
    raise RuntimeError(
        f"{compiler().description} cannot pass __fp16 by value, which the simulator uses for Metal's half:\n{result.stderr}"
    )


def cache_dir() -> Path:
    """Folder holding compiled kernels (created on demand)."""
    folder = Path(os.environ.get("METAL_SIM_CACHE") or Path(tempfile.gettempdir()) / "foundry-metal-sim")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.lru_cache(maxsize=1)
def _toolchain_key() -> bytes:
    digest = hashlib.sha256()
    for part in (*compiler().command, compiler().description, *compiler_flags()):
        digest.update(part.encode() + b"\0")
    for file_name in (*SHIM_FILES, RUNTIME_FILE):
        digest.update((HERE / file_name).read_bytes())
    return digest.digest()


def _run_compiler(arguments: list[str], what: str) -> str:
    result = compiler().run(
        [*compiler_flags(), "-I", str(HERE), *arguments],
        capture_output=True,
        text=True,
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
