"""Compile every CUDA kernel variant with nvcc, without a GPU: a cheap check before a device run.

It writes the source exactly as MLX's `cuda_kernel` assembles it (mlx/backend/cuda/custom_kernel.cpp,
`build_kernel`: default header, our header, `namespace mlx::core::cu`, the generated signature,
`constexpr` lines for the template arguments, our body) and compiles it for sm_90 against MLX's
device headers (from an MLX source checkout: --mlx-source DIR, the folder holding `mlx/`).

    python scripts/check_cuda_compile.py --mlx-source /path/to/mlx

With --nvrtc it compiles each text as kernels/cuda_cache.py does (NVRTC, MLX's options, the stand-in for
MLX's utils.cuh): that the stand-in declares all our kernels use.

    python scripts/check_cuda_compile.py --nvrtc .../nvidia/cu13/lib/libnvrtc.so.13 --cccl .../mlx/include/cccl \
        --cuda-include /usr/local/cuda/include
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from foundry_mlx.kernels import (  # noqa: E402
    embed,
    qgemm,
    qgemm_ring,
    qgemm_source,
    qgemv,
    qgemv_batch,
    qgemv_launch,
    qkv_heads,
    sample,
    sdpa,
    sdpa_prefill_mma,
    sdpa_split,
)


def mlx_cuda_source(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], header: str, body: str,
                    template: list[tuple[str, object]]) -> str:
    """MLX's text for the kernel (kernels/cuda_cache.py rebuilds it as custom_kernel.cpp does), dtypes as names."""
    import mlx.core as mx

    from foundry_mlx.kernels import cuda_cache

    arrays = [mx.zeros((1,), dtype=getattr(mx, dtype)) for _, dtype in inputs]
    template = [(key, getattr(mx, value) if isinstance(value, str) else value) for key, value in template]
    return cuda_cache.mlx_source(name, header, body, [n for n, _ in inputs], arrays, [n for n, _ in outputs],
                                 [getattr(mx, dtype) for _, dtype in outputs], template)


def _nvcc_or_nvrtc(args, path: Path, text: str, info: list[str]):
    """Compile `text` with nvcc against MLX's device headers, or (--nvrtc) with NVRTC as kernels/cuda_cache.py does."""
    if args.nvrtc:
        from foundry_mlx.kernels import cuda_cache, nvrtc

        options = cuda_cache.compile_options((9, 0), [f"--include-path={args.cccl}", f"--include-path={args.cuda_include}"])
        try:
            nvrtc.compile_program(text, path.name, options, cuda_cache.HEADERS, [], lib=nvrtc.library(args.nvrtc))
            return subprocess.CompletedProcess([], 0, "", "")
        except nvrtc.NvrtcError as error:
            return subprocess.CompletedProcess([], 1, "", str(error))
    return subprocess.run([args.nvcc, "-std=c++17", "-arch=sm_90", "-c", "-o", "/dev/null", f"-I{args.mlx_source}",
                           *info, str(path)], capture_output=True, text=True)


def variants():
    for variant in (qgemv.Variant(), qgemv.Variant(residual=True), qgemv.Variant(bias=True),
                    qgemv.Variant(norm=True), qgemv.Variant(norm=True, swiglu=True),
                    qgemv.Variant(norm=True, bias=True, rope=True), qgemv.Variant(norm=True, rope=True)):
        for dtype in ("float16", "bfloat16", "float32"):
            for bits in (4, 5, 6, 8) if dtype == "float16" and os.environ.get("ALL_BITS") else (5,):
                yield variant, dtype, bits


def _compile(args, scratch: Path, label: str, name: str, source, types: dict, outputs, template) -> bool:
    header, body = source.launch_text("cuda")
    text = mlx_cuda_source(f"custom_kernel_{name}", [(n, types[n]) for n in source.input_names], outputs, header, body,
                           template)
    path = scratch / f"{name}.cu"
    path.write_text(text)
    info = ["-Xptxas", "-v"] if args.ptxas_info else []
    result = _nvcc_or_nvrtc(args, path, text, info)
    print(f"{'ok' if result.returncode == 0 else 'FAILED':6s} {label}")
    if args.ptxas_info:  # registers, spills and shared memory per kernel
        print("\n".join(line for line in result.stderr.splitlines() if "Used" in line or "spill" in line))
    if result.returncode:
        print(result.stderr[-3000:])
    return result.returncode != 0


def compile_fused(args, scratch: Path) -> bool:
    """The fused decode step's kernels: fused QKV (+ KV write), attention, embedding, sampling."""
    failed = False
    for dtype in ("float16", "bfloat16", "float32"):
        base = {"x": dtype, "w": "uint32", "scales": dtype, "biases": dtype, "norm_weight": dtype, "bias": dtype,
                "residual": dtype, "inv_freq": "float32", "state": "int32", "k_cache": dtype, "v_cache": dtype}
        gemv = [("T", dtype), ("BITS", 5), ("GROUP", 32), ("K", 896), ("UNITS", 576), ("ROWS", 1), ("WARPS_N", 4),
                ("WARPS_K", 2), ("CHUNK", qgemv.chunk(5)), ("HALF", 32), ("ROPE_ROWS", 1024), ("Q_ROWS", 896),
                ("KV_ROWS", 128), ("HEAD_DIM", 64)]
        for variant in (qgemv.Variant(norm=True, bias=True, rope=True, fused=True), qgemv.Variant(residual=True, fused=True),
                        qgemv.Variant(norm=True, swiglu=True, fused=True), qgemv.Variant(norm=True, fused=True)):
            source = qgemv.kernel_source(variant, "cuda", 1e-6)
            failed |= _compile(args, scratch, f"{source.name} {dtype}", f"{source.name}_{dtype}", source, base,
                               [("y", dtype)], gemv)
        source = sdpa.fused_source(0.125)
        failed |= _compile(args, scratch, f"fused attention {dtype}", f"attention_fused_{dtype}", source,
                           {"q": dtype, "keys": dtype, "values": dtype, "state": "int32"}, [("out", dtype)],
                           [("T", dtype), ("D", 64), ("HEADS", 14), ("KV_HEADS", 2), ("WARPS", 8)])
        source = sdpa_split.split_source(0.125)
        failed |= _compile(args, scratch, f"split attention {dtype}", f"attention_split_{dtype}", source,
                           {"q": dtype, "keys": dtype, "values": dtype, "state": "int32", "parts": "float32"},
                           [("out", dtype)], [("T", dtype), ("D", 128), ("HEADS", 28), ("KV_HEADS", 4), ("WARPS", 4)])
        source = embed.kernel_source()
        failed |= _compile(args, scratch, f"embedding {dtype}", f"embed_{dtype}", source,
                           {"state": "int32", "table": "uint32", "scales": dtype, "biases": dtype}, [("x", dtype)],
                           [("T", dtype), ("HIDDEN", 896), ("THREADS", 256), ("BITS", 5), ("GROUP", 32), ("DENSE", False)])
        source = sample.kernel_source("cuda")
        failed |= _compile(args, scratch, f"sampling {dtype}", f"sample_{dtype}", source,
                           {"logits": dtype, "params": "float32", "state": "int32", "recent": "int32"},
                           [("next_state", "int32"), ("token_out", "int32"), ("work", "float32")],
                           [("T", dtype), ("V", 151936), ("THREADS", 1024), ("RECENT", 64)])
    failed |= compile_layer(args, scratch)
    failed |= compile_batched(args, scratch)
    return failed


def compile_batched(args, scratch: Path) -> bool:
    """The batched fused step's kernels (kernels/fused_batch.py) at the 0.5B shape, B = 8."""
    failed = False
    for dtype in ("float16", "bfloat16", "float32"):
        types = {"x": dtype, "w": "uint32", "scales": dtype, "biases": dtype, "norm_weight": dtype, "bias": dtype,
                 "residual": dtype, "inv_freq": "float32", "state": "int32", "k_cache": dtype, "v_cache": dtype}
        for variant, units, k, bits in ((qgemv.Variant(norm=True, bias=True, rope=True, fused=True), 576, 896, 8),
                                        (qgemv.Variant(norm=True, rope=True, fused=True), 576, 896, 4),
                                        (qgemv.Variant(residual=True, fused=True), 896, 4864, 4),
                                        (qgemv.Variant(norm=True, swiglu=True, fused=True), 4864, 896, 5),
                                        (qgemv.Variant(norm=True, fused=True), 151936, 896, 6)):
            constants, _ = qgemv_launch.shape_constants(units, k, bits, 32)
            columns = units if variant.swiglu else units * variant.rows_per_unit
            template = [("T", dtype), *constants.items(), ("HALF", 32), ("ROPE_ROWS", 1024), ("BATCH", 8),
                        ("Y_COLS", columns), ("STATE_STRIDE", 8), ("Q_ROWS", 896), ("KV_ROWS", 128), ("HEAD_DIM", 64),
                        ("STAGE", bits != 6)]
            source = qgemv_batch.kernel_source(variant, "cuda", 1e-6)
            failed |= _compile(args, scratch, f"{source.name} B=8 bits={bits} {dtype}", f"{source.name}_{dtype}",
                               source, types, [("y", dtype)], template)
        source = sdpa.batched_source(0.125)
        failed |= _compile(args, scratch, f"batched attention {dtype}", f"attention_batch_{dtype}", source,
                           {"q": dtype, "keys": dtype, "values": dtype, "state": "int32"}, [("out", dtype)],
                           [("T", dtype), ("D", 64), ("HEADS", 14), ("KV_HEADS", 2), ("WARPS", 8),
                            ("QKV_COLS", 1152), ("STATE_STRIDE", 8)])
        source = embed.batched_source()
        failed |= _compile(args, scratch, f"batched embedding {dtype}", f"embed_batch_{dtype}", source,
                           {"state": "int32", "table": "uint32", "scales": dtype, "biases": dtype}, [("x", dtype)],
                           [("T", dtype), ("HIDDEN", 896), ("THREADS", 256), ("BITS", 5), ("GROUP", 32),
                            ("DENSE", False), ("GROUPS", 4), ("STATE_STRIDE", 8)])
        source = sample.batched_source("cuda")
        failed |= _compile(args, scratch, f"batched sampling {dtype}", f"sample_batch_{dtype}", source,
                           {"logits": dtype, "params": "float32", "state": "int32", "recent": "int32"},
                           [("next_state", "int32"), ("token_out", "int32"), ("work", "float32")],
                           [("T", dtype), ("V", 151936), ("THREADS", 1024), ("RECENT", 64), ("PARAMS_STRIDE", 8),
                            ("STATE_STRIDE", 8)])
    return failed


class _Linear:
    def __init__(self, rows, columns, bits, bias=False):
        self.out_features, self.in_features, self.bits, self.group_size = rows, columns, bits, 64
        self._bias = bias

    def __contains__(self, name):
        return name == "bias" and self._bias


def compile_layer(args, scratch: Path) -> bool:
    """The one-launch layer kernel (kernels/fused_layer.py) at Qwen2.5-0.5B's shape, two bit mixes."""
    from types import SimpleNamespace

    from foundry_mlx.kernels import fused_layer

    failed = False
    for bits, down_bits in ((4, 4), (8, 4)):
        attention = SimpleNamespace(qkv_proj=_Linear(1152, 896, bits, bias=True), o_proj=_Linear(896, 896, bits),
                                    n_heads=14, n_kv_heads=2, rope=SimpleNamespace(dims=64), eps=1e-6, scale=0.125)
        mlp = SimpleNamespace(gate_up_proj=_Linear(9728, 896, bits), down_proj=_Linear(896, 4864, down_bits), eps=1e-6)
        source, names = fused_layer.layer_source(attention, mlp)
        types = {n: "uint32" if n.endswith("_w") else "float16" for n in names}
        types |= {"inv_freq": "float32", "state": "int32", "attn_parts": "float32"}
        failed |= _compile(args, scratch, f"layer kernel bits {bits}/{down_bits}", f"layer_{bits}_{down_bits}", source,
                           types, [(n, "float16") for n in source.output_names],
                           [("T", "float16")])
    return failed


def compile_qgemm(args, scratch: Path) -> bool:
    """The prefill GEMM (kernels/qgemm.py): every tile, both dtypes, every bit width, each epilogue
    (on the 4-bit 128-row tile), split-K (fp32 partials, no epilogue) on the 128- and 16-row tiles and
    its sum (reduce_source), and the experimental ring schedule (kernels/qgemm_ring.py)."""
    failed = False

    def gemm(source, dtype: str, bits: int, group: int, tile, split: bool, ahead: int = 1) -> bool:
        types = {"x": dtype, "w": "uint32", "scales": dtype, "biases": dtype, "bias": dtype, "residual": dtype}
        template = ([("T", dtype), ("BITS", bits), ("GROUP", group), ("BM", tile[0]), ("BN", tile[1]),
                     ("WARPS_M", tile[2]), ("WARPS_N", tile[3])] + ([("AHEAD", ahead)] if ahead > 1 else [])
                    + ([("SPLIT_K", 4)] if split else []))
        label = (f"{source.name} {dtype} bits={bits} group={group} tile={tile[0]}x{tile[1]}"
                 + (f" ahead={ahead}" if ahead > 1 else "") + (" split=4" if split else ""))
        outputs = [("y", "float32" if split else dtype)]
        return _compile(args, scratch, label, f"{source.name}_{dtype}_{bits}_{tile[0]}_{ahead}", source, types,
                        outputs, template)

    variants = ((False, False, False), (True, True, False), (False, False, True))  # bias, residual, split
    for dtype in ("float16", "bfloat16"):
        for bits, group in ((4, 64), (5, 32), (6, 128), (8, 32)):
            for tile in qgemm.CUDA_TILES.values():
                for bias, residual, split in variants:
                    if (bias or residual) and (bits, tile[0]) != (4, 128):
                        continue
                    if split and tile[0] not in (128, 16):
                        continue
                    failed |= gemm(qgemm_source.kernel_source("cuda", bias, residual, split), dtype, bits, group,
                                   tile, split)
        for ahead, split in ((2, False), (3, False), (2, True)):
            failed |= gemm(qgemm_ring.kernel_source("cuda", not split, not split, split), dtype, 4, 64,
                           qgemm.CUDA_TILES["128x128"], split, ahead)
        for bias, residual, swiglu in ((False, False, False), (True, True, False), (False, False, True)):
            source = qgemm_source.reduce_source(bias, residual, swiglu)  # split-K's sum of the partials
            types = {"partials": "float32", "bias": dtype, "residual": dtype}
            failed |= _compile(args, scratch, f"{source.name} {dtype}", f"{source.name}_{dtype}", source, types,
                               [("y", dtype)], [("T", dtype), ("THREADS", 256)])
        for summed, bias in ((False, False), (True, False), (True, True)):  # the QKV product into heads, RoPE
            source = qkv_heads.kernel_source(summed, bias)
            failed |= _compile(args, scratch, f"{source.name} {dtype}", f"{source.name}_{dtype}", source,
                               {"y": dtype, "partials": "float32", "bias": dtype, "inv_freq": "float32",
                                "offset": "int32"}, [(n, dtype) for n in "qkv"],
                               [("T", dtype), ("THREADS", 256), ("HEADS", 14), ("KV_HEADS", 2), ("D", 64)]
                               + ([("BATCH", 1)] if summed else []))
        for dim, heads, kv_heads in ((64, 14, 2), (128, 28, 4)):  # a short prompt's causal attention
            # CUDA runs the tensor-core rendition only (sdpa_prefill.run); the SIMD-group-per-row body
            # is Metal's, checked in the CPU harness (tests/kernels/test_sdpa_prefill_metal.py).
            source = sdpa_prefill_mma.kernel_source(1.0 / dim ** 0.5)
            failed |= _compile(args, scratch, f"{source.name} {dtype} D={dim}", f"{source.name}_{dtype}_{dim}", source,
                               {"q": dtype, "k": dtype, "v": dtype}, [("out", dtype)],
                               [("T", dtype), ("D", dim), ("HEADS", heads), ("KV_HEADS", kv_heads)])
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlx-source", type=Path, help="MLX source checkout (nvcc compiles against its headers)")
    parser.add_argument("--nvrtc", type=Path, help="libnvrtc.so: compile as kernels/cuda_cache.py does instead of nvcc")
    parser.add_argument("--cccl", type=Path, help="with --nvrtc: CCCL headers (MLX's CUDA wheel: mlx/include/cccl)")
    parser.add_argument("--cuda-include", type=Path, default=Path("/usr/local/cuda/include"), help="with --nvrtc")
    parser.add_argument("--nvcc", default="nvcc")
    parser.add_argument("--only", choices=["qgemm", "layer", "fused"], help="compile only this kernel family")
    parser.add_argument("--ptxas-info", action="store_true", help="print each kernel's registers and spills")
    args = parser.parse_args()
    if not args.nvrtc and not args.mlx_source:
        parser.error("give --mlx-source (nvcc) or --nvrtc and --cccl")
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        if args.only == "qgemm":
            return 1 if compile_qgemm(args, Path(scratch)) else 0
        if args.only == "layer":
            return 1 if compile_layer(args, Path(scratch)) else 0
        if args.only == "fused":  # the fused step's kernels, the layer kernel and their batched forms
            return 1 if compile_fused(args, Path(scratch)) else 0
        for dtype in ("float16", "float32"):
            header, body = sdpa.SOURCE.launch_text("cuda")
            types = {"q": dtype, "keys": dtype, "values": dtype, "valid": "int32", "softmax_scale": "float32"}
            template = [("T", dtype), ("D", 64), ("HEADS", 14), ("KV_HEADS", 2), ("WARPS", sdpa.warps_for(2304))]
            text = mlx_cuda_source("custom_kernel_attention", [(n, types[n]) for n in sdpa.SOURCE.input_names],
                                   [("out", dtype)], header, body, template)
            path = Path(scratch) / f"attention_{dtype}.cu"
            path.write_text(text)
            result = _nvcc_or_nvrtc(args, path, text, [])
            print(f"{'ok' if result.returncode == 0 else 'FAILED':6s} decode attention {dtype}")
            if result.returncode:
                print(result.stderr[-3000:])
                return 1
        if compile_qgemm(args, Path(scratch)) or compile_fused(args, Path(scratch)):
            return 1
        for variant, dtype, bits in variants():
            source = qgemv.kernel_source(variant, "cuda")
            header, body = source.launch_text("cuda")
            types = {"x": dtype, "w": "uint32", "scales": dtype, "biases": dtype, "norm_weight": dtype, "eps": "float32",
                     "bias": dtype, "residual": dtype, "inv_freq": "float32", "position": "int32"}
            template = [("T", dtype), ("BITS", bits), ("GROUP", 32), ("K", 896), ("UNITS", 1152), ("ROWS", 2),
                        ("WARPS_N", 4), ("WARPS_K", 2), ("CHUNK", qgemv.chunk(bits)), ("HALF", 32), ("ROPE_ROWS", 1024)]
            text = mlx_cuda_source(f"custom_kernel_{source.name}", [(n, types[n]) for n in source.input_names],
                                   [("y", dtype)], header, body, template)
            path = Path(scratch) / f"{source.name}_{dtype}_{bits}.cu"
            path.write_text(text)
            result = _nvcc_or_nvrtc(args, path, text, [])
            status = "ok" if result.returncode == 0 else "FAILED"
            print(f"{status:6s} {source.name} {dtype} bits={bits}")
            if result.returncode:
                failures += 1
                print(result.stderr[-3000:])
                if failures > 2:
                    return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
