"""NVRTC, the CUDA runtime compiler, through ctypes: what kernels/cuda_cache.py compiles with.

MLX compiles custom kernels with NVRTC too but keeps the result only for the process that compiled
it (kernels/cuda_cache.py says why that matters and what we do about it). We call the same library
MLX links (`libnvrtc.so.13` for MLX's CUDA 13 wheel, already loaded by `import mlx.core`) with the
same options, so the code is what MLX would have produced. Nothing here needs a GPU except
`compute_capability`, which asks the driver.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path


class NvrtcError(RuntimeError):
    """NVRTC is missing, or rejected a program (the message carries its log)."""


_LIBRARY_NAMES = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")
_nvrtc = None


def library(path: str | Path | None = None):
    """The NVRTC library: the one at `path`, else the one this process has loaded (MLX's), else
    whichever the loader finds."""
    global _nvrtc
    if path is not None:
        return _bind(ctypes.CDLL(str(path)))
    if _nvrtc is None:
        candidates = [p for p in _loaded_paths() if "libnvrtc.so" in p and "builtins" not in p] + list(_LIBRARY_NAMES)
        found = ctypes.util.find_library("nvrtc")
        candidates += [found] if found else []
        for candidate in candidates:
            try:
                _nvrtc = _bind(ctypes.CDLL(candidate))
                break
            except OSError:
                continue
        else:
            raise NvrtcError("libnvrtc is not loadable in this process (MLX's CUDA wheel brings it)")
    return _nvrtc


def _loaded_paths() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line and "/" in line})
    except OSError:
        return []


def _bind(lib):
    c_char_pp = ctypes.POINTER(ctypes.c_char_p)
    for name, args in (
        ("nvrtcVersion", [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]),
        ("nvrtcCreateProgram", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                c_char_pp, c_char_pp]),
        ("nvrtcAddNameExpression", [ctypes.c_void_p, ctypes.c_char_p]),
        ("nvrtcCompileProgram", [ctypes.c_void_p, ctypes.c_int, c_char_pp]),
        ("nvrtcGetLoweredName", [ctypes.c_void_p, ctypes.c_char_p, c_char_pp]),
        ("nvrtcGetProgramLogSize", [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
        ("nvrtcGetProgramLog", [ctypes.c_void_p, ctypes.c_char_p]),
        ("nvrtcGetCUBINSize", [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
        ("nvrtcGetCUBIN", [ctypes.c_void_p, ctypes.c_char_p]),
        ("nvrtcGetPTXSize", [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]),
        ("nvrtcGetPTX", [ctypes.c_void_p, ctypes.c_char_p]),
        ("nvrtcDestroyProgram", [ctypes.POINTER(ctypes.c_void_p)]),
        ("nvrtcGetErrorString", [ctypes.c_int]),
    ):
        function = getattr(lib, name)
        function.argtypes = args
        function.restype = ctypes.c_char_p if name == "nvrtcGetErrorString" else ctypes.c_int
    return lib


def version(lib=None) -> tuple[int, int]:
    lib = lib or library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(lib, status: int, what: str) -> None:
    if status != 0:
        raise NvrtcError(f"{what} failed: {lib.nvrtcGetErrorString(status).decode()}")


def _strings(values) -> ctypes.Array:
    return (ctypes.c_char_p * max(len(values), 1))(*[v.encode() for v in values])


def compile_program(source: str, name: str, options: list[str], headers: dict[str, str] | None = None,
                    name_expressions: list[str] = (), sass: bool = True, lib=None) -> tuple[bytes, dict[str, str]]:
    """Compile `source` (file name `name`) and return (cubin if `sass` else PTX, {expression: lowered
    name}) for each of `name_expressions` (e.g. a kernel's qualified name). `headers` maps include
    names to their text, served from memory as MLX serves its device headers."""
    lib = lib or library()
    headers = headers or {}
    program = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), len(headers),
                                       _strings(list(headers.values())), _strings(list(headers))), "nvrtcCreateProgram")
    try:
        for expression in name_expressions:
            _check(lib, lib.nvrtcAddNameExpression(program, expression.encode()), "nvrtcAddNameExpression")
        status = lib.nvrtcCompileProgram(program, len(options), _strings(options))
        if status != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(program, log)
            raise NvrtcError(f"NVRTC could not compile {name}: {log.value.decode(errors='replace')[-3000:]}")
        lowered = {}
        for expression in name_expressions:
            out = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(out)), "nvrtcGetLoweredName")
            lowered[expression] = out.value.decode()
        get_size, get = (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN) if sass else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
        size = ctypes.c_size_t()
        _check(lib, get_size(program, ctypes.byref(size)), "get size")
        binary = ctypes.create_string_buffer(size.value)
        _check(lib, get(program, binary), "get binary")
        return binary.raw, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def compute_capability(ordinal: int = 0) -> tuple[int, int]:
    """(major, minor) of CUDA device `ordinal`, from the driver MLX has loaded."""
    cuda = ctypes.CDLL("libcuda.so.1")
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    for status in (cuda.cuInit(0), cuda.cuDeviceGet(ctypes.byref(device), ordinal),
                   cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device),  # COMPUTE_CAPABILITY_MAJOR
                   cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)):  # COMPUTE_CAPABILITY_MINOR
        if status != 0:
            raise NvrtcError(f"the CUDA driver returned error {status} asking for device {ordinal}'s architecture")
    return major.value, minor.value
