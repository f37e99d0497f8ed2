"""One launch per transformer layer on CUDA: the fused step's five kernels as phases of one
kernel, separated by grid-wide barriers.

Why: after the fused step (kernels/fused_step.py) a decode step is 5·layers + 3 graph nodes and
MLX still spends several µs of host time on each; one kernel per layer makes it layers + 3 (27
for the 0.5B model). The phases are the same kernel bodies (qgemv.body, sdpa.BODY), each run over
"virtual threadgroups" (g = blockIdx.x, += gridDim.x) with its own template constants in a scope
of its own, so the arithmetic is the one the 5-kernel step's GPU tests verified:

    norm+QKV+bias+RoPE+KV write → | → attention, positions split in shares, each head's last share
      merging the head → | → o_proj+residual → | → norm+gate/up+SwiGLU → | → down+residual

The barrier (`foundry_grid_sync`) keeps its counter and generation in `__device__` globals of the
kernel's own module (tiny MLX buffers live in managed memory, where a barrier costs ~500 µs; a
device global costs ~1.5 µs, measured on the H200). It needs every block resident at once: the
grid is `BLOCKS` (128) blocks of 256 threads with a few KB of shared memory, far below an
H100/H200's 132 SMs × 2048 threads. Every spin is bounded (~1 s): a barrier that never completes
lets the kernel finish with wrong values (the tests would see them) instead of hanging the GPU.
CUDA only: Metal has no grid-wide barrier, so on Apple silicon the 5-kernel step runs.

Chosen per model (`suits`: on CUDA when a layer's weights fit in L2 several times over, so the
0.5B models; `FOUNDRY_LAYER_KERNEL=1/0` forces it). Measured on the H200, 0.5B 4-bit, decode
tok/s at depth 0 / 2048 (`benchmarks/results/h200-step-overheads.md`, `h200-qwen2.5-0.5b-4bit.md`):
the first version (ac92069) 928 / 391, with one block of 8 warps per query head at depth 2048 and
gate/up taking ~10 rounds of the blocks; with each head's positions split over the idle blocks,
the later phases' weights prefetched into L2, one round of the blocks per phase and the
intermediates in one scratch buffer (cd8404b): 1,180 / 1,023 against mlx-lm's 298 / 294. Then
clock marks inside the kernel (FOUNDRY_LAYER_TIMING, fa7d717) showed where a layer's 31 µs went:
gate/up 8.9 µs for ~5 MB, each barrier ~1.9 µs, a one-position attention 5.3 µs: dependent
round trips, not bytes. So each GEMV phase now loads its weights and epilogue operands into
registers before the barrier it waits on (qgemv_preload.py), the barrier is one atomic per block,
and a head's last share reads the other shares' parts at once: 22.5 µs a layer at depth 128 and
1,487 / 1,279 tok/s against mlx-lm's 221 / 201 in the same run (e0eb2b6). Measured and dropped:
spinning at the barrier instead of sleeping, 132 blocks instead of 128, and all 24 layers in one
launch (the body in a loop, a barrier between layers), which was slower (1,000 vs 902 µs at depth
0) and gave wrong outputs on the GPU: a later layer re-reads buffers other blocks rewrote in the
same launch, past what the barrier orders for plain loads through L1. A persistent kernel needs
those re-reads L1-bypassing (`ld.global.cg`).
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import fused_layer_metal, fused_layer_timing, qgemv, qgemv_launch, qgemv_preload, sdpa, sdpa_split
from .source import KernelSource, literal_tag, rewritten

# Blocks of the launch (every one resident at once, or the barrier cannot complete) and the
# barrier's poll interval: settings to measure, FOUNDRY_LAYER_BLOCKS / FOUNDRY_SYNC_SLEEP_NS.
BLOCKS = int(os.environ.get("FOUNDRY_LAYER_BLOCKS", "128"))
# Metal (fused_layer_metal.py, opt-in): an Apple GPU keeps far fewer threadgroups resident.
METAL_BLOCKS = int(os.environ.get("FOUNDRY_LAYER_BLOCKS", "16"))


def blocks_for(backend: str) -> int:
    """Threadgroups of a layer-kernel launch: all must be resident at once for its barriers."""
    return BLOCKS if backend == "cuda" else METAL_BLOCKS
SYNC_SLEEP_NS = int(os.environ.get("FOUNDRY_SYNC_SLEEP_NS", "256"))
# FOUNDRY_LAYER_TIMING=1 builds the kernel with clock marks at every phase's end and after every
# barrier (benchmarks/layer_timing.py reads them): where a layer's device time goes. Off, the
# source carries none of it.
TIMING = os.environ.get("FOUNDRY_LAYER_TIMING", "") == "1"
# GEMV phases load their weights into registers before the barrier they wait on
# (qgemv_preload.preloaded_body), up to this many registers per thread; FOUNDRY_LAYER_PRELOAD=0 turns it off.
PRELOAD = os.environ.get("FOUNDRY_LAYER_PRELOAD", "1") != "0"
PRELOAD_REGISTERS = 96
PHASES, MARKS = fused_layer_timing.PHASES, fused_layer_timing.MARKS
WARPS = qgemv_launch.WARPS  # 8 SIMD-groups: the GEMV bodies' threadgroup, and the attention phase's


def _header() -> str:
    """The barrier and prefetch helpers; SYNC_SLEEP_NS is how long a waiting block sleeps between
    polls of the barrier's generation (0: it spins)."""
    sleep = f"__nanosleep({SYNC_SLEEP_NS})" if SYNC_SLEEP_NS else "(void)0"
    return rewritten(_HEADER, (("__nanosleep(256)", sleep),), once=True)


_HEADER = """
#define SHARE_COUNTERS(p) reinterpret_cast<unsigned int*>(p)
// Arrivals at grid barriers since the module loaded: one atomic per block and barrier, never reset.
// Every launch has the same grid and every block passes the same barriers, so barrier n of the
// process completes when the count reaches (n + 1) * gridDim.x; a block learns n from the value
// its own arrival returns. (The first version kept a count and a generation: four dependent
// atomics on the last block's path, ~1.9 µs per barrier by the H200's timing marks.) 64 bits:
// no wrap in practice, whatever the grid.
__device__ unsigned long long foundry_sync_arrived = 0ull;
__device__ __forceinline__ void foundry_grid_sync() {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned long long arrived = atomicAdd(&foundry_sync_arrived, 1ull);
    const unsigned long long target = (arrived / gridDim.x + 1ull) * gridDim.x;
    unsigned int spins = 0;
    while (*reinterpret_cast<volatile unsigned long long*>(&foundry_sync_arrived) < target && ++spins < (1u << 22))
      __nanosleep(256);
    __threadfence();
  }
  __syncthreads();
}
// Ask L2 for `bytes` from `base`, spread over the whole grid (one 128-byte line per thread and
// round): issued at the layer's start for the weights of the later phases and the cached K/V, so
// their DRAM reads overlap the first phases instead of waiting behind each grid barrier.
__device__ __forceinline__ void foundry_prefetch_l2(const void* base, long bytes) {
  const char* p = static_cast<const char*>(base);
  const long stride = (long)gridDim.x * blockDim.x * 128;
  for (long at = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 128; at < bytes; at += stride)
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p + at));
}
"""


def _mark(k: int) -> str:
    return f"  foundry_mark(foundry_marks, {k}, MARKS, foundry_start);" if TIMING else ""


def _scope(constants: dict, pointers: list[tuple[str, str, str]], groups: int, body: str, phase: int,
           preload: str = "", before_wait: str = "") -> str:
    """Phase `phase`: its template constants and input/output names bound in a scope of its own; then
    (from the second phase on) the grid-wide barrier that waits for the previous phase; then its
    body, run for each virtual threadgroup this block owns. A phase with a `preload` (a GEMV's
    weight loads, qgemv_preload.preloaded_body) runs in one round of the blocks (virtual threadgroup =
    block) and issues those loads before the barrier, followed by `before_wait`."""
    lines = ["  {"]
    # A string value is a run-time expression (the cache capacity, from the cache's shape).
    lines += [f"    const int {name} = {value};" if isinstance(value, str) else f"    constexpr int {name} = {int(value)};"
              for name, value in constants.items()]
    # `auto`: the input's own pointer type (CUDA `const T*`, Metal `const device T*`).
    lines += [f"    auto {name} = {source};" for _, name, source in pointers]
    if preload:
        lines += ["    const unsigned int group_id = blockIdx.x;", preload]
    lines.append(before_wait)
    if phase > 0:
        lines.append("  foundry_grid_sync();")
        lines.append(_mark(2 * phase - 1))
    if preload:
        lines += [f"    if (group_id < {groups}u) {{", body, "    }"]
    else:
        lines.append(f"    for (unsigned int virtual_group = blockIdx.x; virtual_group < {groups}u; virtual_group += gridDim.x) {{")
        lines.append("      const unsigned int group_id = virtual_group;")
        lines.append(body)
        lines.append("    }")
    # Shared memory is reused by this block's next virtual threadgroup or phase: let every warp finish first.
    lines.append("      BARRIER();")
    lines.append("  }")
    lines.append(_mark(2 * phase))
    return "\n".join(line for line in lines if line)


def _gemv_phase(variant, eps, constants: dict, pointers: list, groups: int, phase: int, before_wait: str = "",
                blocks: int = BLOCKS) -> str:
    """A GEMV phase, with its weights loaded before the barrier where they fit in registers
    (PRELOAD_REGISTERS) and the phase takes one round of the blocks; the loop form otherwise."""
    if PRELOAD and groups <= blocks and qgemv_preload.fits(constants, variant.rows_per_unit, PRELOAD_REGISTERS):
        load, compute = qgemv_preload.preloaded_body(variant, eps)
        return _scope(constants, pointers, groups, compute, phase, preload=load, before_wait=before_wait)
    return _scope(constants, pointers, groups, qgemv.body(variant, eps), phase, before_wait=before_wait)


# The layer kernel is chosen for models whose layers' weights fit in L2 several times over: it
# prefetches a layer's later phases into L2 at the layer's start and runs on BLOCKS blocks, which
# suits small layers (0.5B: ~9 MB). A 7B layer (~117 MB at 4 bits) would thrash the H200's 50 MB L2
# and needs more loads in flight than 128 blocks keep: it takes the five-kernel step.
MAX_LAYER_BYTES = 16 << 20

CAPACITY = "k_cache_shape[2]"  # positions the cache buffers hold: read at run time, not compiled in


def suits(model) -> bool:
    """Whether `model` decodes with one launch per layer by default (CUDA)."""
    layer = model.layers[0]
    linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
    return sum(linear.weight.nbytes + linear.scales.nbytes + linear.biases.nbytes for linear in linears) <= MAX_LAYER_BYTES


MAX_SLOTS = 24  # rows a SIMD-group accumulates at once in a phase (registers: acc[SLOTS])


def _gemv_constants(units: int, k: int, layer, rows_per_unit: int = 1, blocks: int = BLOCKS) -> tuple[dict, int]:
    """The GEMV geometry with enough rows per SIMD-group that every block covers its share of the
    units in one round. Measured on the H200 (00a511e → this): with the per-kernel geometry (1–2
    rows per SIMD-group) gate/up took ~10 rounds per block, each renormalising x and waiting on
    its own loads, and the layer kernel spent ~43 µs per layer on the GPU against the five
    kernels' ~23. More rows per SIMD-group put all of a block's loads in flight at once."""
    constants, _ = qgemv_launch.shape_constants(units, k, layer.bits, layer.group_size)
    rows = max(constants["ROWS"], -(-units // (blocks * constants["WARPS_N"])))
    constants["ROWS"] = min(rows, MAX_SLOTS // rows_per_unit)
    return constants, -(-units // (constants["WARPS_N"] * constants["ROWS"]))


def layer_source(attention, mlp, backend: str = "cuda") -> tuple[KernelSource, list[str]]:
    """The kernel of one layer shape (bits, widths, heads) and its input names. The cache capacity
    S is read from the cache's shape at run time: one compile serves every capacity. `backend`
    "metal": the experimental Metal rendition (fused_layer_metal.py)."""
    blocks = blocks_for(backend)
    qkv, o_proj, gate_up, down = attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj
    heads, kv_heads, dims = attention.n_heads, attention.n_kv_heads, attention.rope.dims
    hidden, ffn = o_proj.out_features, down.in_features
    has_bias = "bias" in qkv
    phases = []
    # 1. RMSNorm + QKV + bias + RoPE, K/V rows written into the cache.
    variant = qgemv.Variant(norm=True, bias=has_bias, rope=True, fused=True)
    constants, groups = _gemv_constants(qkv.out_features // 2, hidden, qkv, 2, blocks)
    constants |= dict(HALF=dims // 2, ROPE_ROWS=(heads + kv_heads) * dims, Q_ROWS=heads * dims,
                      KV_ROWS=kv_heads * dims, HEAD_DIM=dims, S=CAPACITY)
    pointers = [("const uint32_t*", "w", "qkv_w"), ("const T*", "scales", "qkv_scales"),
                ("const T*", "biases", "qkv_biases"), ("const T*", "norm_weight", "input_norm"),
                ("T*", "y", "MUTABLE(T, scratch)")]
    if has_bias:
        pointers.append(("const T*", "bias", "qkv_bias"))
    prefetch = _prefetch(o_proj, gate_up, down, kv_heads, dims)
    phases.append(_gemv_phase(variant, attention.eps, constants, pointers, groups, 0, before_wait=prefetch,
                              blocks=blocks))
    # 2. Attention of every query head over the first state[0] + 1 positions, each head's positions
    # split into SPLITS shares (one virtual threadgroup each).
    splits = attention_splits(heads, blocks)
    # Each head's last share to finish merges the head's shares (sdpa_split.merged_split_body): no merge
    # phase and no grid barrier of its own.
    body = sdpa.from_state(sdpa_split.merged_split_body(), attention.scale)
    constants = dict(D=dims, HEADS=heads, KV_HEADS=kv_heads, S=CAPACITY, WARPS=WARPS, SPLITS=splits)
    pointers = [("const T*", "q", "scratch"), ("const T*", "keys", "k_cache"), ("const T*", "values", "v_cache"),
                ("float*", "parts", "MUTABLE(float, attn_parts)"), ("T*", "out", "MUTABLE(T, scratch) + ATTENDED_AT"),
                ("unsigned int*", "shares_done",
                 f"SHARE_COUNTERS(MUTABLE(float, attn_parts) + {sdpa_split.counters_at(heads, splits, dims)})")]
    phases.append(_scope(constants, pointers, heads * splits, body, phase=1))
    # 3. o_proj + residual (the layer's input).
    constants, groups = _gemv_constants(hidden, heads * dims, o_proj, 1, blocks)
    # `residual` first: it names the layer's input before `x` is rebound to the attention output.
    pointers = [("const T*", "residual", "x"), ("const T*", "x", "scratch + ATTENDED_AT"), ("const uint32_t*", "w", "o_w"),
                ("const T*", "scales", "o_scales"), ("const T*", "biases", "o_biases"), ("T*", "y", "MUTABLE(T, scratch) + H_AT")]
    phases.append(_gemv_phase(qgemv.Variant(residual=True, fused=True), None, constants, pointers, groups, 2,
                              blocks=blocks))
    # 4. RMSNorm + gate/up + SwiGLU.
    constants, groups = _gemv_constants(ffn, hidden, gate_up, 2, blocks)
    pointers = [("const T*", "x", "scratch + H_AT"), ("const uint32_t*", "w", "gate_up_w"), ("const T*", "scales", "gate_up_scales"),
                ("const T*", "biases", "gate_up_biases"), ("const T*", "norm_weight", "post_norm"),
                ("T*", "y", "MUTABLE(T, scratch) + ACTIVATED_AT")]
    phases.append(_gemv_phase(qgemv.Variant(norm=True, swiglu=True, fused=True), mlp.eps, constants, pointers, groups, 3,
                              blocks=blocks))
    # 5. down + residual: the layer's output.
    constants, groups = _gemv_constants(hidden, ffn, down, 1, blocks)
    pointers = [("const T*", "x", "scratch + ACTIVATED_AT"), ("const uint32_t*", "w", "down_w"), ("const T*", "scales", "down_scales"),
                ("const T*", "biases", "down_biases"), ("const T*", "residual", "scratch + H_AT"), ("T*", "y", "x_out")]
    phases.append(_gemv_phase(qgemv.Variant(residual=True, fused=True), None, constants, pointers, groups, 4,
                              before_wait=_NEXT_QKV_PREFETCH, blocks=blocks))
    inputs = ["x", "qkv_w", "qkv_scales", "qkv_biases", "input_norm"] + (["qkv_bias"] if has_bias else [])
    inputs += ["inv_freq", "state", "k_cache", "v_cache", "o_w", "o_scales", "o_biases", "post_norm",
               "gate_up_w", "gate_up_scales", "gate_up_biases", "down_w", "down_scales", "down_biases",
               "scratch", "attn_parts", "next_qkv_w", "next_qkv_scales", "next_qkv_biases"]
    shape = "_".join(str(v) for v in (qkv.bits, o_proj.bits, gate_up.bits, down.bits, hidden, ffn, heads, kv_heads,
                                      dims, int(has_bias)))
    tag = "_".join(literal_tag(v) for v in (attention.eps, mlp.eps, attention.scale))
    name = f"foundry_layer_{shape}_{tag}"
    # The phases' intermediates go to one scratch buffer written in place (an input), not to fresh
    # outputs: MLX spends ~2 µs of host time allocating each output of each launch (measured on the
    # H200: a kernel with 6 outputs cost 13 µs more per launch than one with 1).
    offsets = scratch_offsets(qkv.out_features, heads * dims, hidden, ffn)
    layout = "".join(f"  constexpr long {name.upper()}_AT = {offset};\n" for name, offset in offsets.items())
    outputs = ("x_out",)
    body = layout + "\n".join(phases)
    if backend == "metal":
        sync_at = sdpa_split.parts_size(heads, dims, splits)  # the barrier's two counters, after the parts
        return KernelSource(name + "_metal", tuple(inputs), outputs, fused_layer_metal.prologue(sync_at) + body,
                            qgemv._HEADER["metal"] + fused_layer_metal.HEADER), inputs
    header = qgemv._HEADER["cuda"] + _header()
    if TIMING:
        marks_at = sdpa_split.parts_size(heads, dims, splits)  # after the attention's parts and counters
        body, header, name = fused_layer_timing.timed(body, header, name, marks_at)
    return KernelSource(name, tuple(inputs), outputs, body, header), inputs


def scratch_offsets(qkv_rows: int, attended: int, hidden: int, ffn: int) -> dict[str, int]:
    """Where each intermediate starts in the scratch buffer (elements), and its total length."""
    offsets, at = {}, 0
    for name, size in (("qkv", qkv_rows), ("attended", attended), ("h", hidden), ("activated", ffn)):
        offsets[name] = at
        at += -(-size // 8) * 8  # 16-byte aligned starts for the GEMVs' vector loads
    offsets["scratch_size"] = at
    return offsets


def attention_splits(heads: int, blocks: int = BLOCKS) -> int:
    """Shares of the positions per head in the attention phase: enough to give every block one."""
    return max(1, min(16, blocks // heads))


def _prefetch(o_proj, gate_up, down, kv_heads: int, dims: int) -> str:
    lines = []
    for prefix, layer in (("o", o_proj), ("gate_up", gate_up), ("down", down)):
        rows, columns = layer.out_features, layer.in_features
        groups = rows * (columns // layer.group_size)
        lines.append(f"  foundry_prefetch_l2({prefix}_w, {rows * columns * layer.bits // 8}l);")
        lines.append(f"  foundry_prefetch_l2({prefix}_scales, {groups}l * (long)sizeof(T));")
        lines.append(f"  foundry_prefetch_l2({prefix}_biases, {groups}l * (long)sizeof(T));")
    lines.append(f"  for (int h = 0; h < {kv_heads}; ++h) {{")
    lines.append(f"    const long offset = (long)h * {CAPACITY} * {dims}, bytes = (long)state[0] * {dims} * (long)sizeof(T);")
    lines.append("    foundry_prefetch_l2(k_cache + offset, bytes);")
    lines.append("    foundry_prefetch_l2(v_cache + offset, bytes);")
    lines.append("  }")
    return "\n".join(lines) + "\n"


# The next layer's QKV weights (its inputs next_qkv_*, sizes from their shapes: a mix of quant
# types may give them other widths) asked of L2 during the down phase: the next launch's first
# phase reads them, and from DRAM it took ~4.8 µs (h200-layer-timing-e0eb2b6.txt), the slowest
# phase but gate/up for a tenth of its bytes.
_NEXT_QKV_PREFETCH = """  foundry_prefetch_l2(next_qkv_w, (long)next_qkv_w_shape[0] * next_qkv_w_shape[1] * 4l);
  foundry_prefetch_l2(next_qkv_scales, (long)next_qkv_scales_shape[0] * next_qkv_scales_shape[1] * (long)sizeof(T));
  foundry_prefetch_l2(next_qkv_biases, (long)next_qkv_biases_shape[0] * next_qkv_biases_shape[1] * (long)sizeof(T));
"""


def launch_arguments(x, attention, mlp, state, keys, values, next_attention=None,
                     backend: str = "cuda") -> tuple[KernelSource, dict]:
    """The layer kernel and the keyword arguments of its call: (source, kwargs). `next_attention`
    (the next layer's; None for the last) names the QKV weights the kernel asks L2 for."""
    qkv, o_proj, gate_up, down = attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj
    source, names = layer_source(attention, mlp, backend)
    rope = attention.rope
    arrays = {
        "x": x, "qkv_w": qkv.weight, "qkv_scales": qkv.scales, "qkv_biases": qkv.biases,
        "input_norm": attention.norm_weight, "inv_freq": rope.inverse_frequencies, "state": state,
        "k_cache": keys, "v_cache": values, "o_w": o_proj.weight, "o_scales": o_proj.scales,
        "o_biases": o_proj.biases, "post_norm": mlp.norm_weight, "gate_up_w": gate_up.weight,
        "gate_up_scales": gate_up.scales, "gate_up_biases": gate_up.biases, "down_w": down.weight,
        "down_scales": down.scales, "down_biases": down.biases,
    }
    if "qkv_bias" in names:
        arrays["qkv_bias"] = qkv.bias
    following = (next_attention or attention).qkv_proj
    arrays |= {"next_qkv_w": following.weight, "next_qkv_scales": following.scales, "next_qkv_biases": following.biases}
    arrays["scratch"], arrays["attn_parts"] = scratch_buffers(attention, mlp, x.dtype, backend)
    threads = WARPS * 32
    kwargs = dict(
        inputs=[arrays[n] for n in names],
        template=[("T", x.dtype)],
        grid=(blocks_for(backend) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(o_proj.out_features,)],
        output_dtypes=[x.dtype],
    )
    return source, kwargs


_scratches: dict[tuple, mx.array] = {}


def scratch_buffers(attention, mlp, dtype: mx.Dtype, backend: str = "cuda") -> tuple[mx.array, mx.array]:
    """The layer's scratch buffers (intermediates in `dtype`, attention shares in float32), made on
    first use. `GpuKernels.prepare` asks for them before the step is traced: a buffer made while
    tracing would become a node of every step."""
    heads, dims = attention.n_heads, attention.rope.dims
    sizes = scratch_offsets(attention.qkv_proj.out_features, heads * dims, attention.o_proj.out_features,
                            mlp.down_proj.in_features)
    # The attention's parts, one share counter per head (sdpa_split.merged_split_body), then the marks.
    parts = sdpa_split.parts_size(heads, dims, attention_splits(heads, blocks_for(backend)))
    parts += fused_layer_metal.SYNC_SLOTS if backend == "metal" else (2 * MARKS if TIMING else 0)
    return scratch(sizes["scratch_size"], dtype), scratch(parts, mx.float32)


def scratch(size: int, dtype: mx.Dtype) -> mx.array:
    """One device buffer per size and dtype, shared by every layer's launch: the layers run one
    after another (each takes the previous one's output), so one layer's intermediates are dead
    before the next layer writes its own."""
    key = (size, dtype)
    if key not in _scratches:
        _scratches[key] = mx.zeros((size,), dtype=dtype)
        mx.eval(_scratches[key])
    return _scratches[key]


def reference_layer(kernels, x, attention, mlp, state, keys, values):
    """The same layer as the fused step's five calls (any kernel set)."""
    qkv, keys, values = kernels.qkv(x, attention, state, keys, values)
    out = kernels.attention(qkv, attention, state, keys, values)
    h = kernels.residual(out, attention.o_proj, x)
    return kernels.residual(kernels.swiglu(h, mlp), mlp.down_proj, h), keys, values


def reset_scratch(buffer: mx.array) -> None:
    """Put a zeroed buffer in `buffer`'s place (same size and dtype) for the next launches: the
    timing marks (FOUNDRY_LAYER_TIMING=1) keep maxima across launches otherwise."""
    key = (buffer.size, buffer.dtype)
    _scratches[key] = mx.zeros((buffer.size,), dtype=buffer.dtype)
    mx.eval(_scratches[key])
