"""One kernel source, two GPU backends.

A kernel body is written once against a small portable vocabulary; a per-backend prelude (the
`header` MLX pastes before the generated signature) and prologue (the first lines of the body)
define it. What differs between MLX's two custom-kernel APIs, and how it is bridged:

| need                   | Metal (`mx.fast.metal_kernel`)                | CUDA (`mx.fast.cuda_kernel`)           |
|------------------------|-----------------------------------------------|----------------------------------------|
| thread / group / lane  | named attributes, e.g. thread_index_in_simdgroup | threadIdx / blockIdx                |
| warp reduction         | `simd_sum`                                    | `__shfl_xor_sync` butterfly            |
| shared memory, barrier | `threadgroup`, `threadgroup_barrier`          | `__shared__`, `__syncthreads`          |
| scalar inputs          | `constant T&` (use the name)                  | `const T*` (use name[0])               |
| template parameters    | `template <...>` on the kernel                | `constexpr` lines inside the body      |

In both, template parameters are invisible to the header (helpers there take values as
arguments) and the launch grid is counted in threads, not groups. Portable names used by bodies:
`thread_id`, `group_id`, `lane`, `warp` (prologue), `SIMD_SUM(v)`, `BARRIER()`, `SHARED`,
`SCALAR(name)`, `SIMD_SHUFFLE_XOR(v, mask)`, `NEG_INFINITY`, `PRECISE_COS/SIN/EXP/RSQRT(v)`,
`UINT` (32-bit unsigned index type), `MUTABLE(T, input)` (an input pointer written in place: the
fused decode step's KV cache and token history, see kernels/fused_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("metal", "cuda")

_PRELUDE = {
    "metal": """
#define SIMD_SUM(v) simd_sum(v)
#define SIMD_SHUFFLE_XOR(v, mask) simd_shuffle_xor(v, (ushort)(mask))
#define NEG_INFINITY (-INFINITY)
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define SHARED threadgroup
#define SCALAR(name) (name)
#define PRECISE_COS(v) metal::precise::cos(v)
#define PRECISE_SIN(v) metal::precise::sin(v)
#define PRECISE_EXP(v) metal::precise::exp(v)
#define PRECISE_RSQRT(v) metal::precise::rsqrt(v)
#define UINT uint
#define MUTABLE(T, pointer) ((device T*)(pointer))
""",
    "cuda": """
__device__ __forceinline__ float foundry_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
#define SIMD_SUM(v) foundry_warp_sum(v)
#define SIMD_SHUFFLE_XOR(v, mask) __shfl_xor_sync(0xffffffffu, v, mask)
#define NEG_INFINITY (-__int_as_float(0x7f800000))
#define BARRIER() __syncthreads()
#define SHARED __shared__ __align__(16)
#define SCALAR(name) (name[0])
#define PRECISE_COS(v) cosf(v)
#define PRECISE_SIN(v) sinf(v)
#define PRECISE_EXP(v) expf(v)
#define PRECISE_RSQRT(v) rsqrtf(v)
#define UINT unsigned int
#define MUTABLE(T, pointer) (const_cast<T*>(pointer))
""",
}

_PROLOGUE = {
    "metal": """
  const uint thread_id = thread_position_in_threadgroup.x;
  const uint group_id = threadgroup_position_in_grid.x;
  const uint lane = thread_index_in_simdgroup;
  const uint warp = simdgroup_index_in_threadgroup;
""",
    "cuda": """
  const unsigned int thread_id = threadIdx.x;
  const unsigned int group_id = blockIdx.x;
  const unsigned int lane = threadIdx.x & 31u;
  const unsigned int warp = threadIdx.x >> 5;
""",
}


@dataclass(frozen=True)
class KernelSource:
    """A kernel as MLX's APIs take it, before the backend is chosen."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    body: str
    header: str = ""
    # CUDA only: (most threads per block, fewest blocks per SM) as `__launch_bounds__`, which caps
    # registers so that many blocks fit on an SM (see `_launch_bounds`).
    launch_bounds: tuple[int, int] | None = None

    def render(self, backend: str) -> tuple[str, str]:
        """(header, source) for `mx.fast.metal_kernel` or `mx.fast.cuda_kernel`."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        header, body = _PRELUDE[backend] + self.header, _PROLOGUE[backend] + self.body
        if backend == "cuda" and self.launch_bounds is not None:
            header, body = _launch_bounds(header, body, *self.launch_bounds)
        return header, body

    def launch_text(self, backend: str) -> tuple[str, str]:
        """`render`'s (header, source) without comments and indentation: what MLX is given. MLX
        hashes a kernel's whole source at every launch (measured on the H200: 0.23 µs per KB per
        launch, ~2 µs for an 8 KB source), and a decode step launches 27–123 of them."""
        header, source = self.render(backend)
        return compact(header), compact(source)

    def build(self, backend: str, shared_memory: int = 0):
        """The MLX kernel object (compiled lazily by MLX on first call; on CUDA, into MLX's on-disk
        cache by kernels/cuda_cache.py, so later processes load it instead of compiling).
        `shared_memory`: CUDA's dynamic shared memory per block, in bytes (`extern __shared__`)."""
        import mlx.core as mx

        header, source = self.launch_text(backend)
        options = dict(name=f"{self.name}_{backend}", input_names=list(self.input_names),
                       output_names=list(self.output_names), source=source, header=header)
        if backend == "metal":
            if shared_memory:
                raise ValueError("dynamic shared memory is CUDA's: Metal kernels declare theirs")
            kernel = mx.fast.metal_kernel(**options)
        else:
            kernel = mx.fast.cuda_kernel(**options, shared_memory=shared_memory)
        if backend == "cuda":  # compiled once per machine, not per process: kernels/cuda_cache.py
            from . import cuda_cache

            if cuda_cache.enabled():
                return cuda_cache.CachedCudaKernel(kernel, f"{self.name}_{backend}", header, source, self.input_names,
                                                   self.output_names)
        return kernel


def _launch_bounds(header: str, body: str, threads: int, blocks: int) -> tuple[str, str]:
    """`__launch_bounds__(threads, blocks)` on the kernel MLX generates. `mx.fast.cuda_kernel`
    writes the signature itself (`__global__ void name(...)`, right after our header) and takes no
    attributes for it, so the header's last lines redefine `__global__` to carry the bounds and the
    body's first line restores it. Why it matters: NVRTC (what MLX and kernels/cuda_cache.py compile
    with) gave the prefill GEMM 156 registers where nvcc gives the same source 125, so one 256-thread
    block fit on an H200 SM instead of two (Nsight Compute: 12.4% achieved occupancy,
    benchmarks/results/h200-ncu-qgemm-*-9c8f864.txt); capped at 128 it spills nothing (6-bit: 8 bytes)."""
    redefine = ('#pragma push_macro("__global__")\n#undef __global__\n'
                f"#define __global__ __location__(global) __launch_bounds__({threads}, {blocks})\n")
    return header + redefine, '#pragma pop_macro("__global__")\n' + body


def rewritten(text: str, replacements, once: bool = False) -> str:
    """`text` with each (old, new) of `replacements` applied in turn: how a kernel's batched or
    split form is derived from its one body. An `old` the text no longer holds (exactly once with
    `once`, else at least once, every occurrence replaced) is an error, so a change to the body
    fails loudly instead of leaving the derived form stale."""
    for old, new in replacements:
        count = text.count(old)
        if count == 0 or (once and count != 1):
            raise AssertionError(f"{old!r} is in the kernel body {count} times, not {'once' if once else 'at least once'}: "
                                 "its derived form needs updating")
        text = text.replace(old, new)
    return text


def compact(text: str) -> str:
    """C++/MSL text without blank lines, indentation and `//` comments (lines stay lines, for the
    preprocessor). Kernel sources hold no `//` inside string literals; one that did would keep its
    comment-looking tail, since only a `//` after an even number of quotes starts a comment."""
    lines = []
    for line in text.splitlines():
        cut = line.find("//")
        while cut >= 0 and line[:cut].count('"') % 2:
            cut = line.find("//", cut + 2)
        if cut >= 0:
            line = line[:cut]
        line = line.strip()
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


def float_literal(value: float) -> str:
    """A float32 constant as C++/MSL source text that round-trips exactly (`1e-06f`)."""
    import numpy as np

    text = repr(float(np.float32(value)))
    text = text if ("e" in text or "." in text or "inf" in text or "nan" in text) else text + ".0"
    return text + "f"


def literal_tag(value: float) -> str:
    """`float_literal(value)` as identifier characters, for kernel names (`1e-06` → `1em06`): every
    distinct source needs a distinct name, and a baked-in constant makes a distinct source."""
    return float_literal(value).rstrip("f").replace(".", "p").replace("-", "m").replace("+", "")


_scalars: dict[tuple, object] = {}


def scalar(value: float | int, dtype):
    """A 0-d kernel input, made once per value: every layer of a decode step shares the same
    position and eps arrays instead of creating (and copying to the GPU) one per kernel call."""
    import mlx.core as mx

    key = (value, dtype)
    array = _scalars.get(key)
    if array is None:
        if len(_scalars) > 4096:
            _scalars.clear()
        array = _scalars[key] = mx.array(value, dtype=dtype)
    return array
