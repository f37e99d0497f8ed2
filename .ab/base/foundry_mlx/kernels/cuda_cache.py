"""Our CUDA kernels compiled once per machine, not once per process.

MLX compiles a `mx.fast.cuda_kernel` with NVRTC the first time a process launches it, and keeps
the result for that process only. Its on-disk cache (`MLX_PTX_CACHE_DIR`, by default
`$TMPDIR/mlx/<version>/ptx`) is written for MLX's own kernels but only *read* for custom ones:
custom_kernel.cpp asks `get_jit_module(..., use_disk_cache=false)`, and jit_module.cpp looks in the
cache before compiling either way. Measured on the H200 (h200-startup-53d0409.txt): of a 5.5 s
warm start to the first token, ~3.5 s was NVRTC compiling our kernels again.

So we write the entry MLX looks for. On a kernel variant's first launch in a process, if the
cache has no `<module>.ptx`, we compile the very source MLX would compile (rebuilt here as
custom_kernel.cpp's `build_kernel` writes it) with the same NVRTC and options, and write
`<module>.txt` (kernel name → mangled name) and then `<module>.ptx` (the cubin), each atomically.
MLX loads it at the kernel's first evaluation, in this process already and in every later one.
The only difference from MLX's own compile: MLX's device header `utils.cuh` lives inside libmlx,
so NVRTC gets a stand-in declaring what the generated signature needs (`Shape`, `Strides`).

`<module>` is `custom_kernel_<name><template tag>_<std::hash of the source, hex>`, hashed here as
libstdc++'s `std::hash<std::string>` does. Should a later MLX change any of this, the names stop
matching and MLX compiles the kernels itself, as before: slower, never wrong. Any failure here
does the same. `FOUNDRY_KERNEL_CACHE=0` turns it off; the GPU test
tests/kernels/test_cuda_cache_gpu.py checks on the device that MLX loads what we write.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import mlx.core as mx

_CUDA_TYPES = {"bool": "bool", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
               "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t",
               "float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
# get_type_string (mlx/backend/common/compiled.cpp): how a dtype template argument tags the name
_TYPE_TAGS = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "float64": "double",
              "bool": "bool", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
              "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t"}

DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
STAND_IN_UTILS = """#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/cstdint>
#include <cuda/std/limits>
#define MAX_NDIM 10
#define WARP_SIZE 32
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
}
"""


# What NVRTC is given besides the text: the stand-in, under the name MLX's generated source includes.
HEADERS = {"mlx/backend/cuda/device/utils.cuh": STAND_IN_UTILS}


class Unsupported(ValueError):
    """A call this cache does not mirror (an argument MLX would type differently): MLX compiles it."""


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def std_hash(data: bytes, seed: int = 0xC70F6907) -> int:
    """libstdc++'s `std::hash<std::string>` on 64-bit (`_Hash_bytes`, libsupc++/hash_bytes.cc)."""
    mul, mask = 0xC6A4A7935BD1E995, (1 << 64) - 1
    length = len(data)
    value = (seed ^ (length * mul)) & mask
    aligned = length & ~7
    for word in struct.unpack_from(f"<{aligned // 8}Q", data):
        mixed = (word * mul) & mask
        value = ((value ^ (((mixed ^ (mixed >> 47)) * mul) & mask)) * mul) & mask
    if length & 7:
        value = ((value ^ int.from_bytes(data[aligned:], "little")) * mul) & mask
    value = ((value ^ (value >> 47)) * mul) & mask
    return value ^ (value >> 47)


def _template_value(value) -> tuple[str, str]:
    """(name tag, declaration format) of one template argument, as custom_kernel.cpp writes them."""
    if isinstance(value, bool):
        return ("_t" if value else "_f"), "  constexpr bool {} = " + ("true" if value else "false") + ";\n"
    if isinstance(value, int):
        return f"_{value}", "  constexpr int {} = " + str(value) + ";\n"
    if isinstance(value, mx.Dtype):
        name = _dtype_name(value)
        if name not in _CUDA_TYPES:
            raise Unsupported(f"template dtype {name}")
        return "_" + _TYPE_TAGS[name], "  using {} = " + _CUDA_TYPES[name] + ";\n"
    raise Unsupported(f"template argument {value!r}")


def kernel_name(name: str, template) -> str:
    return "custom_kernel_" + name + "".join(_template_value(value)[0] for _, value in template)


def mlx_source(function: str, header: str, source: str, input_names, inputs, output_names, output_dtypes,
               template) -> str:
    """The text MLX compiles for this call (custom_kernel.cpp, `build_kernel`). `inputs` are the
    call's arrays (their dtype and whether they are 0-d matter)."""
    text = [DEFAULT_HEADER, header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
            "__global__ void ", function, "(\n"]
    for name, array in zip(input_names, inputs):
        dtype = _dtype_name(array.dtype)
        if dtype not in _CUDA_TYPES:
            raise Unsupported(f"input dtype {dtype}")
        text += ["    const ", _CUDA_TYPES[dtype], "* ", name, ",\n"]
        if array.ndim > 0:
            for suffix, kind in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
                if name + suffix in source:
                    text += ["    const __grid_constant__ ", kind, " ", name, suffix, ",\n"]
    for index, (name, dtype) in enumerate(zip(output_names, output_dtypes)):
        text += ["    ", _CUDA_TYPES[_dtype_name(dtype)], "* ", name, ",\n" if index < len(output_names) - 1 else ") {\n"]
    if template:
        text += [_template_value(value)[1].format(key) for key, value in template] + ["\n"]
    text += [source, "\n}\n\n} // namespace mlx::core::cu\n"]
    return "".join(text)


def cache_dir() -> Path:
    """Where MLX looks (jit_module.cpp, `ptx_cache_dir`)."""
    chosen = os.environ.get("MLX_PTX_CACHE_DIR")
    if not chosen:
        temp = next((os.environ[v] for v in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(v)), "/tmp")
        chosen = os.path.join(temp, "mlx", mx.__version__, "ptx")
    return Path(os.path.abspath(chosen))


def ptx_path(directory: Path, module: str) -> Path:
    """`get_ptx_path`: names longer than 245 characters are cut into nested folders."""
    limit = 245
    path = directory
    while len(module) > limit:
        path, module = path / module[:limit], module[limit:]
    return path / (module + ".ptx")


def _include_options() -> list[str]:
    """`include_path_args` of jit_module.cpp: MLX's bundled headers, CCCL, then CUDA's."""
    root = Path(mx.__file__).resolve().parent  # site-packages/mlx (libmlx is in mlx/lib)
    options = []
    include = root / "include"
    if include.exists():
        options.append(f"--include-path={include}")
    if (include / "cccl").exists():
        options.append(f"--include-path={include / 'cccl'}")
    cuda = root.parent / "nvidia" / "cu13" / "include"
    if not cuda.exists():
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        cuda = Path(home) / "include"
    options.append(f"--include-path={cuda}")
    return options


def compile_options(arch: tuple[int, int], include_options: list[str] | None = None) -> list[str]:
    """MLX's NVRTC options for `arch` (jit_module.cpp, `compile`); its include paths unless given."""
    major, minor = arch
    return ["--device-as-default-execution-space", f"--gpu-architecture=sm_{major}{minor}{'a' if major >= 9 else ''}",
            *(_include_options() if include_options is None else include_options)]


def write_entry(directory: Path, module: str, function: str, binary: bytes, mangled: str) -> Path:
    """`<module>.txt` then `<module>.ptx`, each written to a temporary file and renamed into place,
    so MLX never reads a half-written entry (it takes the .ptx's presence as the entry's)."""
    path = ptx_path(directory, module)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((path.with_suffix(".txt"), f"mlx::core::cu::{function}\t{mangled}\n".encode()),
                         (path, binary)):
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".foundry-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return path


class CachedCudaKernel:
    """A `mx.fast.cuda_kernel` object whose variants are compiled into MLX's cache on first launch."""

    def __init__(self, kernel, name: str, header: str, source: str, input_names, output_names):
        self._kernel, self._name, self._header, self._source = kernel, name, header, source
        self._input_names, self._output_names = tuple(input_names), tuple(output_names)
        self._seen: set = set()

    def __call__(self, **arguments):
        try:
            self.ensure(arguments.get("inputs", ()), arguments.get("template") or (), arguments["output_dtypes"])
        except Exception as error:  # noqa: BLE001 - a cache miss must never stop a launch: MLX compiles instead
            _report(self._name, error)
        return self._kernel(**arguments)

    def ensure(self, inputs, template, output_dtypes) -> Path | None:
        """Compile this variant into MLX's cache unless it is there; the entry's path (None: known)."""
        if not all(isinstance(array, mx.array) for array in inputs):
            raise Unsupported("an input that is not an mx.array")
        key = (tuple((a.dtype, a.ndim == 0) for a in inputs), tuple(template), tuple(output_dtypes))
        if key in self._seen:
            return None
        self._seen.add(key)  # tried once per process, cached or not: a failure is not retried every launch
        function, module, text = entry(self._name, self._header, self._source, self._input_names, self._output_names,
                                       inputs, template, output_dtypes)
        directory = cache_dir()
        path = ptx_path(directory, module)
        if not path.exists():
            compile_entry(directory, module, function, text)
        return path


def entry(name: str, header: str, source: str, input_names, output_names, inputs, template, output_dtypes):
    """(kernel function name, MLX's module name, MLX's source text) of one launch of a kernel."""
    function = kernel_name(name, template)
    text = mlx_source(function, header, source, input_names, inputs, output_names, output_dtypes, template)
    return function, f"{function}_{std_hash(text.encode()):x}", text


def compile_entry(directory: Path, module: str, function: str, text: str) -> Path:
    """Compile `text` as MLX would and write it to `directory` as `module`'s entry."""
    from . import nvrtc

    qualified = "mlx::core::cu::" + function
    binary, lowered = nvrtc.compile_program(text, module + ".cu", compile_options(_arch()), HEADERS, [qualified])
    return write_entry(directory, module, function, binary, lowered[qualified])


_architecture: tuple[int, int] | None = None
_reported: set = set()


def _arch() -> tuple[int, int]:
    global _architecture
    if _architecture is None:
        from . import nvrtc

        _architecture = nvrtc.compute_capability()
    return _architecture


def _report(name: str, error: Exception) -> None:
    """Say once per process why a kernel was not kept (later ones only count: one line, not ten)."""
    _reported.add(name)
    if len(_reported) == 1:
        import sys

        print(f"foundry-mlx: kernel {name} is compiled by MLX in this process, not kept across processes "
              f"({type(error).__name__}: {str(error)[:300]}); other kernels failing the same way are not reported. "
              "FOUNDRY_KERNEL_CACHE=0 turns the cache off.", file=sys.stderr)


def enabled() -> bool:
    return os.environ.get("FOUNDRY_KERNEL_CACHE", "1") != "0"
