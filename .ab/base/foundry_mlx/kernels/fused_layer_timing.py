"""The layer kernel's clock marks (FOUNDRY_LAYER_TIMING=1, kernels/fused_layer.py): block 0's and
the slowest block's elapsed clock at the end of every phase and after every barrier, written after
the attention's parts in the layer's float32 scratch, and the launch's ns and cycles (block 0) to
convert them. benchmarks/layer_timing.py reads them. CUDA only; without the switch the kernel's
source carries none of it.
"""

from __future__ import annotations

PHASES = 5
MARKS = 2 * PHASES + 2  # per phase: body done, barrier passed; then the kernel's ns and cycles (block 0)
TIMING_HEADER = """
// Block 0's elapsed clock at mark k in marks[k]; the slowest block's in marks[MARKS + k].
__device__ __forceinline__ void foundry_mark(unsigned int* marks, int k, int count, long long start) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int elapsed = (unsigned int)(clock64() - start);
    if (blockIdx.x == 0) marks[k] = elapsed;
    atomicMax(marks + count + k, elapsed);
  }
}
"""
TIMING_START = """  const long long foundry_start = clock64();
  unsigned long long foundry_start_ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(foundry_start_ns));
  unsigned int* foundry_marks = reinterpret_cast<unsigned int*>(MUTABLE(float, attn_parts) + MARKS_AT);
"""
TIMING_END = """  if (blockIdx.x == 0 && threadIdx.x == 0) {
    unsigned long long now_ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now_ns));
    foundry_marks[MARKS - 2] = (unsigned int)(now_ns - foundry_start_ns);
    foundry_marks[MARKS - 1] = (unsigned int)(clock64() - foundry_start);
  }
"""


def timed(body: str, header: str, name: str, marks_at: int) -> tuple[str, str, str]:
    """The layer kernel's (body, header, name) with the marks' setup and the launch's totals, the
    marks going to float offset `marks_at` of `attn_parts`."""
    body = f"  constexpr int MARKS = {MARKS};\n  constexpr long MARKS_AT = {marks_at};\n" + TIMING_START + body + TIMING_END
    return body, header + TIMING_HEADER, name + "_timed"
