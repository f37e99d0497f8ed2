"""kernels/cuda_cache.py without a GPU: the names MLX gives a custom kernel's cache entry, and how
entries are written. That MLX really loads them is tests/kernels/test_cuda_cache_gpu.py's job."""

from __future__ import annotations

import mlx.core as mx
import pytest

from foundry_mlx.kernels import cuda_cache
from foundry_mlx.kernels.source import KernelSource


@pytest.mark.parametrize("text, expected", [
    # printed by a C++ program built with g++ (libstdc++): printf("%zx", std::hash<std::string>{}(s))
    ("", "553e93901e462a6e"),
    ("a", "454ddee488c1ed6b"),
    ("abcdefg", "deee6830a3af82af"),
    ("abcdefgh", "783db3e38db898bb"),
    ("abcdefghi", "b4ec9257851c8aaf"),
    ("custom_kernel_foundry_qgemv_cuda_float16_t_4_64", "2e289f97edc7ed90"),
])
def test_std_hash_equals_libstdcxx(text, expected):
    assert format(cuda_cache.std_hash(text.encode()), "x") == expected


def test_std_hash_of_arbitrary_bytes_equals_libstdcxx():
    data = bytes(((i * 7 + 3) & 0xFF) for i in range(1000))  # the same C++ program, bytes (char)(i * 7 + 3)
    assert format(cuda_cache.std_hash(data), "x") == "a20fc4e610a1cfa1"


def test_kernel_name_tags_each_template_argument_as_mlx_does():
    template = [("T", mx.float16), ("BITS", 4), ("DENSE", False), ("U", mx.bfloat16), ("F", mx.float32), ("ON", True)]
    assert cuda_cache.kernel_name("foo_cuda", template) == "custom_kernel_foo_cuda_float16_t_4_f_bfloat16_t_float_t"
    assert cuda_cache.kernel_name("foo_cuda", []) == "custom_kernel_foo_cuda"


def test_source_is_built_as_custom_kernel_cpp_builds_it():
    # Written out by hand from mlx/backend/cuda/custom_kernel.cpp's build_kernel: a 0-d input gets no
    # shape parameter even when the body names it; a 1-d input whose shape the body reads gets one.
    body = "  out[0] = x[x_shape[0] - 1] + eps[0]; // eps_shape\n"
    text = cuda_cache.mlx_source(
        "custom_kernel_probe", "#define H 1\n", body, ["x", "eps"], [mx.zeros((4,), mx.float16), mx.array(1.0)],
        ["out", "flag"], [mx.float16, mx.int32], [("T", mx.float16), ("N", 3), ("B", True)])
    assert text == (
        '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
        "#define H 1\n"
        "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        "__global__ void custom_kernel_probe(\n"
        "    const __half* x,\n"
        "    const __grid_constant__ Shape x_shape,\n"
        "    const float* eps,\n"
        "    __half* out,\n"
        "    int32_t* flag) {\n"
        "  using T = __half;\n"
        "  constexpr int N = 3;\n"
        "  constexpr bool B = true;\n"
        "\n"
        "  out[0] = x[x_shape[0] - 1] + eps[0]; // eps_shape\n"
        "\n}\n\n} // namespace mlx::core::cu\n")


def test_untemplated_source_has_no_blank_constant_block():
    text = cuda_cache.mlx_source("custom_kernel_p", "", "  y[0] = 1;", ["x"], [mx.zeros((2,), mx.uint32)], ["y"],
                                 [mx.float32], [])
    assert text.endswith("    const uint32_t* x,\n    float* y) {\n  y[0] = 1;\n}\n\n} // namespace mlx::core::cu\n")


def test_module_name_is_function_and_hash_of_the_text():
    source = KernelSource("probe", ("x",), ("y",), "  y[thread_id] = x[thread_id];\n")
    header, body = source.launch_text("cuda")
    inputs, template = [mx.zeros((8,), mx.float16)], [("T", mx.float16)]
    function, module, text = cuda_cache.entry("probe_cuda", header, body, ("x",), ("y",), inputs, template,
                                              [mx.float16])
    assert function == "custom_kernel_probe_cuda_float16_t"
    assert module == f"{function}_{cuda_cache.std_hash(text.encode()):x}"
    assert body in text and header in text


def test_cache_dir_follows_mlx(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "ptx"))
    assert cuda_cache.cache_dir() == tmp_path / "ptx"
    monkeypatch.delenv("MLX_PTX_CACHE_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert cuda_cache.cache_dir() == tmp_path / "mlx" / mx.__version__ / "ptx"


def test_long_module_names_nest_as_mlx_does(tmp_path):
    name = "a" * 245 + "b" * 245 + "c" * 10
    assert cuda_cache.ptx_path(tmp_path, name) == tmp_path / ("a" * 245) / ("b" * 245) / ("c" * 10 + ".ptx")
    assert cuda_cache.ptx_path(tmp_path, "short") == tmp_path / "short.ptx"


def test_entry_is_written_whole(tmp_path):
    path = cuda_cache.write_entry(tmp_path, "m" * 300, "custom_kernel_x", b"\x7fELF-cubin", "_Z3fooPf")
    assert path.read_bytes() == b"\x7fELF-cubin"
    assert path.with_suffix(".txt").read_text() == "mlx::core::cu::custom_kernel_x\t_Z3fooPf\n"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.with_suffix(".txt").name]


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, **arguments):
        self.calls.append(arguments)
        return ["launched"]


def _launch(kernel):
    return kernel(inputs=[mx.zeros((8,), mx.float16)], template=[("T", mx.float16)], grid=(8, 1, 1),
                  threadgroup=(8, 1, 1), output_shapes=[(8,)], output_dtypes=[mx.float16])


def test_present_entry_is_not_compiled_again(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    compiled = []
    monkeypatch.setattr(cuda_cache, "compile_entry", lambda *args: compiled.append(args))
    inner = _Recorder()
    kernel = cuda_cache.CachedCudaKernel(inner, "probe_cuda", "", "  y[0] = x[0];\n", ("x",), ("y",))
    assert _launch(kernel) == ["launched"] and len(compiled) == 1  # absent: compiled
    directory, module, function, text = compiled[0]
    assert directory == tmp_path and function == "custom_kernel_probe_cuda_float16_t"
    cuda_cache.write_entry(directory, module, function, b"cubin", "_Z1f")
    fresh = cuda_cache.CachedCudaKernel(inner, "probe_cuda", "", "  y[0] = x[0];\n", ("x",), ("y",))
    _launch(fresh)
    _launch(fresh)
    assert len(compiled) == 1 and len(inner.calls) == 3  # present: loaded by MLX, never compiled here


def test_a_failing_compile_still_launches_and_is_tried_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_cache, "_reported", set())
    attempts = []

    def broken(*args):
        attempts.append(args)
        raise OSError("no libnvrtc here")

    monkeypatch.setattr(cuda_cache, "compile_entry", broken)
    inner = _Recorder()
    kernel = cuda_cache.CachedCudaKernel(inner, "broken_probe_cuda", "", "  y[0] = x[0];\n", ("x",), ("y",))
    for _ in range(3):
        assert _launch(kernel) == ["launched"]
    assert len(attempts) == 1 and len(inner.calls) == 3
    assert "broken_probe_cuda is compiled by MLX in this process" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cuda_build_is_wrapped_unless_turned_off(monkeypatch):
    made = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: made.append(kw) or _Recorder())
    source = KernelSource("probe", ("x",), ("y",), "  y[0] = x[0];\n")
    assert isinstance(source.build("cuda"), cuda_cache.CachedCudaKernel)
    monkeypatch.setenv("FOUNDRY_KERNEL_CACHE", "0")
    assert isinstance(source.build("cuda"), _Recorder)
    assert made[0]["name"] == "probe_cuda"


def test_failures_are_reported_once_per_process(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_cache, "_reported", set())
    monkeypatch.setattr(cuda_cache, "compile_entry", lambda *args: (_ for _ in ()).throw(PermissionError("read-only")))
    for name in ("first_cuda", "second_cuda"):
        _launch(cuda_cache.CachedCudaKernel(_Recorder(), name, "", "  y[0] = x[0];\n", ("x",), ("y",)))
    err = capsys.readouterr().err
    assert err.count("foundry-mlx: kernel") == 1 and "first_cuda" in err and "PermissionError: read-only" in err


def test_launch_bounds_reach_the_generated_signature_only():
    """`KernelSource.launch_bounds` puts `__launch_bounds__` on the kernel MLX declares after our
    header, and nowhere else: the text MLX compiles, run through clang's preprocessor with CUDA's
    own definitions of `__global__` and `__launch_bounds__` (crt/host_defines.h), declares the
    kernel with the bounds, and a `__global__` written after the body's first line is plain again."""
    from foundry_mlx.kernels.metal_sim import build
    from foundry_mlx.kernels.source import KernelSource

    source = KernelSource("probe", ("x",), ("out",), "out[0] = x[0];\n__global__ void later();\n",
                          launch_bounds=(256, 2))
    header, body = source.launch_text("cuda")
    text = cuda_cache.mlx_source("custom_kernel_probe_cuda", header, body, ["x"], [mx.zeros((4,), mx.float16)],
                                 ["out"], [mx.float16], [])
    host_defines = ("#define __annotate__(a) __attribute__((a))\n#define __location__(a) __annotate__(a)\n"
                    "#define __global__ __location__(global)\n"
                    "#define __launch_bounds__(...) __annotate__(launch_bounds(__VA_ARGS__))\n")
    text = host_defines + "".join(line + "\n" for line in text.splitlines() if not line.startswith("#include"))
    result = build.compiler().run(["-E", "-P", "-x", "c++", "-"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expanded = " ".join(result.stdout.split())
    assert ("__attribute__((global)) __attribute__((launch_bounds(256, 2))) void custom_kernel_probe_cuda("
            in expanded), expanded
    assert "__attribute__((global)) void later();" in expanded
    assert expanded.count("launch_bounds") == 1
    plain = KernelSource("probe", ("x",), ("out",), "out[0] = x[0];\n", launch_bounds=(256, 2))
    assert "launch_bounds" not in "".join(plain.launch_text("metal"))
    assert "launch_bounds" not in "".join(KernelSource("probe", ("x",), ("out",), "out[0] = x[0];\n").launch_text("cuda"))


def test_the_prefill_gemm_is_bounded_to_two_blocks_per_sm():
    from foundry_mlx.kernels import qgemm_source

    for split in (False, True):
        header, _ = qgemm_source.kernel_source("cuda", split=split).launch_text("cuda")
        assert "__launch_bounds__(256, 2)" in header
    assert qgemm_source.MAX_REGISTERS == 128
