"""Sampling on device: repetition penalty, temperature, top-k, top-p, min-p and a seeded draw, in
one kernel that turns the LM head's logits into the next token id (and the next step's state).

Why a kernel: a decode step that ends in a token id on the device never waits for the host, and
MLX's op-by-op sampler costs a sort and a dozen launches over the 151,936-entry vocabulary.

One threadgroup does it all (a vocabulary is a few hundred KB, resident in L2 after the LM head
wrote it), in passes over the logits:
1. w = logits / T, the repetition penalty applied to the ids in the `recent` ring (CTRL style:
   positive logits divided by the penalty, negative multiplied) — written to `work`;
2. the maximum M and Z = Σ exp(w - M) (online softmax);
3. thresholds: min-p is closed form (M + log min_p); top-k and top-p are found by bisection on
   the ordered bit pattern of the float keys, both at once, each pass counting (top-k) or summing
   probability mass (top-p) above a probe. Tokens more than 64 nats below the best are never
   eligible (their probability is below 1e-27), which bounds the search;
4. the draw: u = hash(seed, step) in [0, 1); walking the eligible tokens {w ≥ τ} in index order,
   the first whose cumulative weight exceeds u · Σ weights — each thread owns a contiguous chunk,
   chunk sums are scanned, one thread finds the token in its chunk.
Greedy (T = 0) is the argmax of the penalized logits (ties: lowest id), one pass.

`state` (int32[8], device-resident, written by this kernel for the next step):
[0] position the next token is fed at, [1] that token, [2] draws so far (the RNG counter),
[3] seed, [4] writes into the `recent` ring so far. The token also goes to `token_out` (4 bytes,
which MLX keeps in host-visible memory): the host reads that, never `state`, because a host read
moves an MLX buffer out of device memory and the next step reads `state` on the device. `params` (float32[8]): temperature, top_k,
top_p, min_p, repetition penalty. The reference twin (`reference`) runs the same arithmetic in
`mlx` ops and Python, so the same seed gives the same tokens on every backend (up to float
rounding at a boundary).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .source import KernelSource, rewritten

STATE_SIZE = 8  # int32s: more than MLX's 8-byte small-buffer limit, so the array lives in device memory
PARAMS_SIZE = 8
MAX_BELOW_BEST = 64.0  # nats below the best token beyond which nothing is eligible

_HEADER = """
DEVICE_INLINE unsigned int foundry_ordered_key(float v) {
  const unsigned int bits = AS_UINT(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
DEVICE_INLINE float foundry_key_value(unsigned int key) {
  const unsigned int bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return AS_FLOAT(bits);
}
DEVICE_INLINE unsigned int foundry_hash(unsigned int seed, unsigned int counter) {
  unsigned int h = seed * 0x9E3779B1u ^ (counter + 0x7F4A7C15u) * 0x85EBCA77u;
  h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
  return h;
}
"""

_BODY = """
  constexpr int WARPS_ = THREADS / 32;
  SHARED float reduce_a[WARPS_];
  SHARED float reduce_b[WARPS_];
  SHARED int reduce_i[WARPS_];
  SHARED float chunk_sums[THREADS];
  SHARED int chosen[1];
  const int tid = (int)thread_id;
  const float temperature = params[0];
  const int top_k = (int)params[1];
  const float top_p = params[2];
  const float min_p = params[3];
  const float penalty = params[4];
  const bool greedy = temperature <= 0.0f;
  const float inv_t = greedy ? 1.0f : 1.0f / temperature;
  const int ring = state[4];
  const int seen = ring < RECENT ? ring : RECENT;

  // 1. w = penalized logits / T, in `work` (float32). Greedy without a penalty reads the logits.
  const bool direct = greedy && penalty == 1.0f;
  if (!direct) {
    for (int i = tid; i < V; i += THREADS) work[i] = static_cast<float>(logits[i]) * inv_t;
  }
  BARRIER_DEVICE();
  if (penalty != 1.0f) {
    for (int r = tid; r < seen; r += THREADS) {
      const int id = recent[r];
      const float v = static_cast<float>(logits[id]);
      work[id] = (v > 0.0f ? v / penalty : v * penalty) * inv_t;
    }
  }
  BARRIER_DEVICE();

  // 2. Greedy: argmax (lowest id on ties). Otherwise the max M and Z = sum exp(w - M).
  float best = NEG_INFINITY;
  int best_id = 0x7fffffff;
  float total = 0.0f;
  for (int i = tid; i < V; i += THREADS) {
    const float w = direct ? static_cast<float>(logits[i]) : work[i];
    if (w > best) {
      if (!greedy) total = total * PRECISE_EXP(best - w) + 1.0f;
      best = w;
      best_id = i;
    } else if (!greedy) {
      total += PRECISE_EXP(w - best);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = SIMD_SHUFFLE_XOR(best, offset);
    const int other_id = SIMD_SHUFFLE_XOR(best_id, offset);
    const float other_total = SIMD_SHUFFLE_XOR(total, offset);
    const float merged = max(best, other);
    if (!greedy && merged != NEG_INFINITY) {
      total = total * PRECISE_EXP(best - merged) + other_total * PRECISE_EXP(other - merged);
    }
    if (other > best || (other == best && other_id < best_id)) best_id = other_id;
    best = merged;
  }
  if (lane == 0) { reduce_a[warp] = best; reduce_b[warp] = total; reduce_i[warp] = best_id; }
  BARRIER();
  float top = NEG_INFINITY;
  int top_id = 0x7fffffff;
  for (int w = 0; w < WARPS_; ++w) {
    if (reduce_a[w] > top || (reduce_a[w] == top && reduce_i[w] < top_id)) { top = reduce_a[w]; top_id = reduce_i[w]; }
  }
  float z = 0.0f;
  for (int w = 0; w < WARPS_; ++w) if (reduce_a[w] != NEG_INFINITY) z += reduce_b[w] * PRECISE_EXP(reduce_a[w] - top);
  BARRIER();

  int token = top_id;
  if (!greedy) {
    // 3. The threshold tau: tokens with w >= tau are eligible.
    const float floor_value = top - MAX_BELOW;
    unsigned int tau = foundry_ordered_key(floor_value);
    if (min_p > 0.0f) tau = max(tau, foundry_ordered_key(top + PRECISE_LOG(min_p)));
    const bool use_k = top_k > 0 && top_k < V;
    const bool use_p = top_p < 1.0f;
    if (use_k || use_p) {
      // Largest key t with count(key >= t) >= k (top-k), and with mass(key >= t) >= p Z (top-p).
      unsigned int lo_k = foundry_ordered_key(floor_value), hi_k = foundry_ordered_key(top) + 1u;
      unsigned int lo_p = lo_k, hi_p = hi_k;
      if (!use_k) hi_k = lo_k + 1u;
      if (!use_p) hi_p = lo_p + 1u;
      const float target_mass = top_p * z;
      for (int iteration = 0; iteration < 40 && (hi_k - lo_k > 1u || hi_p - lo_p > 1u); ++iteration) {
        const unsigned int mid_k = lo_k + (hi_k - lo_k) / 2u;
        const unsigned int mid_p = lo_p + (hi_p - lo_p) / 2u;
        float count = 0.0f;
        float mass = 0.0f;
        for (int i = tid; i < V; i += THREADS) {
          const float w = work[i];
          const unsigned int key = foundry_ordered_key(w);
          count += key >= mid_k ? 1.0f : 0.0f;
          mass += key >= mid_p ? PRECISE_EXP(w - top) : 0.0f;
        }
        count = SIMD_SUM(count);
        mass = SIMD_SUM(mass);
        if (lane == 0) { reduce_a[warp] = count; reduce_b[warp] = mass; }
        BARRIER();
        count = 0.0f;
        mass = 0.0f;
        for (int w = 0; w < WARPS_; ++w) { count += reduce_a[w]; mass += reduce_b[w]; }
        BARRIER();
        if (hi_k - lo_k > 1u) { if (count >= (float)top_k) lo_k = mid_k; else hi_k = mid_k; }
        if (hi_p - lo_p > 1u) { if (mass >= target_mass) lo_p = mid_p; else hi_p = mid_p; }
      }
      if (use_k) tau = max(tau, lo_k);
      if (use_p) tau = max(tau, lo_p);
    }
    const float threshold = foundry_key_value(tau);

    // 4. The draw: inverse CDF over the eligible tokens in index order, contiguous chunks per thread.
    constexpr int CHUNK = (V + THREADS - 1) / THREADS;
    const int begin = tid * CHUNK;
    const int end = min(begin + CHUNK, V);
    float mine = 0.0f;
    int last_eligible = -1;
    for (int i = begin; i < end; ++i) {
      const float w = work[i];
      if (w >= threshold) { mine += PRECISE_EXP(w - top); last_eligible = i; }
    }
    chunk_sums[tid] = mine;
    if (tid == 0) chosen[0] = -1;
    BARRIER();
    float before = 0.0f;
    float all = 0.0f;
    for (int t = 0; t < THREADS; ++t) {
      before += t < tid ? chunk_sums[t] : 0.0f;
      all += chunk_sums[t];
    }
    const unsigned int bits = foundry_hash((unsigned int)state[3], (unsigned int)state[2]);
    const float u = (float)(bits >> 8) * (1.0f / 16777216.0f);
    const float target = u * all;
    if (mine > 0.0f && target >= before && target < before + mine) {
      float running = before;
      int pick = last_eligible;
      for (int i = begin; i < end; ++i) {
        const float w = work[i];
        if (w >= threshold) {
          running += PRECISE_EXP(w - top);
          if (running > target) { pick = i; break; }
        }
      }
      chosen[0] = pick;
    }
    BARRIER();
    token = chosen[0] >= 0 ? chosen[0] : top_id;  // rounding put the target past the end: the best
  }
  if (tid == 0) {
    token_out[0] = token;
    next_state[0] = state[0] + 1;
    next_state[1] = token;
    next_state[2] = state[2] + (greedy ? 0 : 1);
    next_state[3] = state[3];
    next_state[4] = ring + 1;
    next_state[5] = state[5];
    next_state[6] = state[6];
    next_state[7] = state[7];
    MUTABLE(int, recent)[ring % RECENT] = token;
  }
"""

_BACKEND_HEADER = {
    "cuda": "#define AS_UINT(v) __float_as_uint(v)\n#define AS_FLOAT(v) __uint_as_float(v)\n"
            "#define BARRIER_DEVICE() __syncthreads()\n#define PRECISE_LOG(v) logf(v)\n#define DEVICE_INLINE __device__ inline\n",
    "metal": "#define AS_UINT(v) as_type<uint>(v)\n#define AS_FLOAT(v) as_type<float>(v)\n"
             "#define BARRIER_DEVICE() threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup)\n"
             "#define PRECISE_LOG(v) metal::precise::log(v)\n#define DEVICE_INLINE inline\n",
}

THREADS = {"cuda": 1024, "metal": 512}


def kernel_source(backend: str) -> KernelSource:
    body = _BODY.replace("MAX_BELOW", f"{MAX_BELOW_BEST:.1f}f")
    return KernelSource("foundry_sample", ("logits", "params", "state", "recent"), ("next_state", "token_out", "work"),
                        body, _BACKEND_HEADER[backend] + _HEADER)


# B rows: threadgroup b draws row b's token with row b's params, state and ring. A parked row
# (state[b, 5] != 0: an empty slot of a batch) draws nothing and keeps its state, so its position
# never moves past the cache. params[b, 5] is the row's penalty window (its own ring length, as a
# single sequence's ring is), at most the ring's width RECENT.
_BATCH_PREFIX = """SHARED int chosen[1];
  {
    const int row = (int)group_id;
    logits += (long)row * V;
    params += row * PARAMS_STRIDE;
    state += row * STATE_STRIDE;
    recent += row * RECENT;
    next_state += row * STATE_STRIDE;
    token_out += row;
    work += (long)row * V;
  }
  if (state[5] != 0) {
    if (thread_id == 0) {
      for (int i = 0; i < STATE_STRIDE; ++i) next_state[i] = state[i];
      token_out[0] = 0;
    }
    return;
  }
  const int window = params[5] >= 1.0f ? min((int)params[5], RECENT) : RECENT;"""
_BATCH_ROWS = (
    ("SHARED int chosen[1];", _BATCH_PREFIX),
    ("const int seen = ring < RECENT ? ring : RECENT;", "const int seen = ring < window ? ring : window;"),
    ("MUTABLE(int, recent)[ring % RECENT] = token;", "MUTABLE(int, recent)[ring % window] = token;"),
)


def batched_source(backend: str) -> KernelSource:
    single = kernel_source(backend)
    return KernelSource("foundry_sample_batch", single.input_names, single.output_names,
                        rewritten(single.body, _BATCH_ROWS, once=True), single.header)


def batched_launch_arguments(logits: mx.array, params: mx.array, state: mx.array, recent: mx.array, backend: str,
                             threads: int | None = None) -> dict:
    """B draws, one threadgroup each: logits (B, V), params (B, 8), state (B, 8), ring (B, R).
    Outputs: next state (B, 8), tokens (B,), the work buffer (B, V)."""
    batch, vocab = logits.shape
    threads = threads or THREADS[backend]
    return dict(
        inputs=[logits, params, state, recent],
        template=[("T", logits.dtype), ("V", vocab), ("THREADS", threads), ("RECENT", recent.shape[1]),
                  ("PARAMS_STRIDE", params.shape[1]), ("STATE_STRIDE", state.shape[1])],
        grid=(threads * batch, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(batch, STATE_SIZE), (batch,), (batch, vocab)],
        output_dtypes=[mx.int32, mx.int32, mx.float32],
    )


def launch_arguments(logits: mx.array, params: mx.array, state: mx.array, recent: mx.array, backend: str,
                     threads: int | None = None) -> dict:
    """Keyword arguments of the kernel call for one draw from `logits` (V,); `recent` is the int32
    ring of the penalty window. Outputs: next state, the token (1,), the work buffer (V,)."""
    vocab = logits.size
    threads = threads or THREADS[backend]
    return dict(
        inputs=[logits if logits.ndim == 1 else logits.reshape(-1), params, state, recent],
        template=[("T", logits.dtype), ("V", vocab), ("THREADS", threads), ("RECENT", recent.size)],
        grid=(threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(STATE_SIZE,), (1,), (vocab,)],
        output_dtypes=[mx.int32, mx.int32, mx.float32],
    )


def make_params(temperature: float, top_k: int, top_p: float, min_p: float, penalty: float) -> mx.array:
    return mx.array(params_row(temperature, top_k, top_p, min_p, penalty), dtype=mx.float32)


# A generation's first token, on CUDA: arrays written on the host (anything over 8 bytes goes to
# managed memory in MLX's allocator) cost the sampler's set-up 0.45-0.7 ms for three of them on the
# H200 (benchmarks/results/h200-ttft-*). So a request's params are made once per distinct value (the
# kernels only read them), its state is stacked on the device from 4-byte scalars (MLX's scalar
# pool), and an empty penalty ring is zeros made on the device.
_shared_params: dict[tuple, mx.array] = {}


def shared_params(temperature: float, top_k: int, top_p: float, min_p: float, penalty: float) -> mx.array:
    """`make_params`' array, one per distinct value for the process (read-only for every kernel)."""
    key = (float(temperature), int(top_k), float(top_p), float(min_p), float(penalty))
    params = _shared_params.get(key)
    if params is None:
        if len(_shared_params) >= 256:
            _shared_params.clear()
        params = _shared_params[key] = make_params(*key)
        mx.eval(params)
    return params


def device_state(position: int, token: int, counter: int, seed: int, ring: int) -> mx.array:
    """`make_state`'s values, stacked by the device from scalars (no host-written buffer)."""
    return mx.stack([mx.array(value, dtype=mx.int32) for value in state_row(position, token, counter, seed, ring)])


def params_row(temperature: float, top_k: int, top_p: float, min_p: float, penalty: float, window: int = 0) -> list:
    """One row of params: the five rules, then (batched kernel only) the penalty window."""
    return [temperature, float(top_k), top_p, min_p, penalty, float(window)] + [0.0] * (PARAMS_SIZE - 6)


def make_state(position: int, token: int, counter: int, seed: int, ring: int) -> mx.array:
    return mx.array(state_row(position, token, counter, seed, ring), dtype=mx.int32)


def state_row(position: int, token: int, counter: int, seed: int, ring: int, parked: bool = False) -> list[int]:
    """One row of state; `parked` (state[5]) marks an empty slot of a batch (batched kernel only)."""
    return [position, token, counter, _as_int32(seed), ring, int(parked), 0, 0]


def _as_int32(seed: int) -> int:
    seed &= 0xFFFFFFFF
    return seed - (1 << 32) if seed >= 1 << 31 else seed


def uniform(seed: int, counter: int) -> float:
    """The kernel's u in [0, 1) for draw `counter` of `seed` (same integer hash)."""
    mask = 0xFFFFFFFF
    h = ((seed & mask) * 0x9E3779B1 & mask) ^ (((counter + 0x7F4A7C15) & mask) * 0x85EBCA77 & mask)
    h ^= h >> 16
    h = h * 0x7FEB352D & mask
    h ^= h >> 15
    h = h * 0x846CA68B & mask
    h ^= h >> 16
    return float(np.float32(h >> 8) * np.float32(1.0 / 16777216.0))


def thresholds(w: np.ndarray, top_k: int, top_p: float, min_p: float) -> float:
    """τ of the kernel's rules on the scaled, penalized logits `w` (float32): eligible = w >= τ."""
    top = np.float32(w.max())
    floor = np.float32(top - np.float32(MAX_BELOW_BEST))
    tau = floor
    if min_p > 0:
        tau = max(tau, np.float32(top + np.float32(math.log(np.float32(min_p)))))
    weights = np.exp((w - top).astype(np.float32))
    order = np.argsort(-w, kind="stable")
    if 0 < top_k < w.size:
        kth = w[order[top_k - 1]]
        tau = max(tau, max(kth, floor))
    if top_p < 1.0:
        cumulative = np.cumsum(weights[order], dtype=np.float64)
        target = np.float32(top_p) * np.float32(weights.sum(dtype=np.float64))
        index = int(np.searchsorted(cumulative, target, side="left"))
        value = w[order[min(index, w.size - 1)]]
        tau = max(tau, max(value, floor))
    return float(tau)


def reference(logits: mx.array, temperature: float, top_k: int, top_p: float, min_p: float, penalty: float,
              recent: list[int], seed: int, counter: int) -> int:
    """The kernel's draw in NumPy/MLX on the host: the oracle, and the CPU path's sampler."""
    w = np.array(logits.astype(mx.float32)).reshape(-1).astype(np.float32)
    original = w.copy()
    if penalty != 1.0 and recent:
        ids = np.array(recent, dtype=np.int64)
        chosen = original[ids]
        w[ids] = np.where(chosen > 0, chosen / np.float32(penalty), chosen * np.float32(penalty)).astype(np.float32)
    if temperature <= 0:
        return int(np.argmax(w))
    w = (w * np.float32(1.0 / np.float32(temperature))).astype(np.float32)
    tau = np.float32(thresholds(w, top_k, top_p, min_p))
    top = np.float32(w.max())
    weights = np.where(w >= tau, np.exp((w - top).astype(np.float32)), 0).astype(np.float32)
    cumulative = np.cumsum(weights, dtype=np.float64)
    target = uniform(seed, counter) * cumulative[-1]
    index = int(np.searchsorted(cumulative, target, side="right"))
    return int(np.argmax(w)) if index >= w.size else index
