// Implementation file (compiled once as its own translation unit with
// `-x c++`; named .h only so that the package data ships it).
//
// SIMT runtime for Metal kernels compiled as C++: one OS thread per GPU thread
// of a threadgroup, threadgroups run one at a time, real barriers, SIMD-groups
// of 32 lanes that exchange values through shared slots.
//
// Every piece of scheduling state sits behind one mutex per launch. That makes
// two things exact: deadlock detection (every live thread of the threadgroup
// waits and no barrier can complete) and the serial schedules, where a single
// token passes from thread to thread at synchronisation points in a fixed
// order so that races between SIMD-groups show up deterministically.
#include "sim_abi.h"

#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

namespace metal_sim {
namespace {

struct Abort {};

enum Schedule { kConcurrent = 0, kForward = 1, kReverse = 2, kRandom = 3 };

struct Barrier {
  std::vector<unsigned> waiters;
  unsigned expected = 0;
  unsigned generation = 0;
  unsigned line = 0;
  unsigned column = 0;
  uint32_t* masks = nullptr; // SIMD barriers: lanes that took part, per parity
};

struct ThreadState {
  std::condition_variable wake;
  bool go = false;
  bool runnable = false;
  bool blocked = false;
  bool finished = false;
  Attributes attributes{};
};

struct Launch {
  void* const* buffers = nullptr;
  Schedule schedule = kConcurrent;
  uint64_t random_state = 0;
  std::mutex mutex;
  std::condition_variable group_done;
  std::unique_ptr<ThreadState[]> threads;
  unsigned active = 0;
  unsigned alive = 0;
  unsigned blocked = 0;
  unsigned finished = 0;
  bool quit = false;
  bool aborted = false;
  std::string error;
  Barrier threadgroup_barrier;
  std::vector<Barrier> simd_barriers;
  std::vector<unsigned char> slots; // [simdgroup][parity][lane][kSlotBytes]
  std::vector<uint32_t> slot_masks; // [simdgroup][parity]
  unsigned char* arena = nullptr;
  size_t arena_bytes = 0;
};

Launch* g_launch = nullptr;
std::mutex g_launch_mutex;
thread_local unsigned t_index = 0;
size_t g_threadgroup_bytes = 0;

bool is_serial(const Launch& launch) {
  return launch.schedule != kConcurrent;
}

std::string describe_waits(const Launch& launch) {
  std::string text;
  char line[256];
  const Barrier& group = launch.threadgroup_barrier;
  if (!group.waiters.empty()) {
    std::snprintf(line, sizeof(line),
        "\n  threadgroup_barrier at line %u: %zu of %u threads waiting",
        group.line, group.waiters.size(), group.expected);
    text += line;
  }
  for (size_t s = 0; s < launch.simd_barriers.size(); ++s) {
    const Barrier& simd = launch.simd_barriers[s];
    if (!simd.waiters.empty()) {
      std::snprintf(line, sizeof(line),
          "\n  simdgroup %zu: SIMD-group function or barrier at line %u: "
          "%zu of %u live lanes waiting",
          s, simd.line, simd.waiters.size(), simd.expected);
      text += line;
    }
  }
  std::snprintf(line, sizeof(line), "\n  threads returned: %u of %u",
      launch.finished, launch.active);
  text += line;
  return text;
}

// Records the first error and wakes every thread of the group so that each
// unwinds (Abort) or skips the kernel, and finishes.
void fail_locked(Launch& launch, const std::string& message) {
  if (launch.aborted) {
    return;
  }
  launch.aborted = true;
  launch.error = message;
  for (unsigned t = 0; t < launch.active; ++t) {
    ThreadState& state = launch.threads[t];
    if (!state.finished) {
      state.go = true;
      state.wake.notify_one();
    }
  }
}

// Serial schedules: give the token to the next runnable thread.
void hand_off_locked(Launch& launch) {
  int next = -1;
  if (launch.schedule == kForward) {
    for (unsigned t = 0; t < launch.active && next < 0; ++t) {
      next = launch.threads[t].runnable ? int(t) : -1;
    }
  } else if (launch.schedule == kReverse) {
    for (unsigned t = launch.active; t-- > 0 && next < 0;) {
      next = launch.threads[t].runnable ? int(t) : -1;
    }
  } else {
    unsigned count = 0;
    for (unsigned t = 0; t < launch.active; ++t) {
      count += launch.threads[t].runnable;
    }
    if (count > 0) {
      uint64_t& x = launch.random_state;
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      unsigned choice = unsigned(x % count);
      for (unsigned t = 0; t < launch.active && next < 0; ++t) {
        if (launch.threads[t].runnable && choice-- == 0) {
          next = int(t);
        }
      }
    }
  }
  if (next >= 0) {
    launch.threads[next].go = true;
    launch.threads[next].wake.notify_one();
  }
}

void complete_locked(Launch& launch, Barrier& barrier) {
  uint32_t lanes = 0;
  for (unsigned t : barrier.waiters) {
    ThreadState& state = launch.threads[t];
    state.blocked = false;
    state.runnable = true;
    launch.blocked--;
    lanes |= 1u << (t % kSimdWidth);
    if (!is_serial(launch)) {
      state.go = true;
      state.wake.notify_one();
    }
  }
  if (barrier.masks != nullptr) {
    barrier.masks[barrier.generation & 1] = lanes;
  }
  barrier.waiters.clear();
  barrier.generation++;
}

void arrive(Barrier& barrier, bool threadgroup, unsigned line, unsigned column) {
  Launch& launch = *g_launch;
  const unsigned self = t_index;
  ThreadState& state = launch.threads[self];
  std::unique_lock<std::mutex> lock(launch.mutex);
  if (launch.aborted) {
    throw Abort{};
  }
  char text[256];
  if (threadgroup && launch.finished > 0) {
    std::snprintf(text, sizeof(text),
        "thread %u reached threadgroup_barrier at line %u after %u thread(s) "
        "of its threadgroup returned; every thread must reach the barrier "
        "(undefined behaviour in Metal)",
        self, line, launch.finished);
    fail_locked(launch, text + describe_waits(launch));
    throw Abort{};
  }
  if (!barrier.waiters.empty() &&
      (barrier.line != line || barrier.column != column)) {
    std::snprintf(text, sizeof(text),
        "divergent %s: thread %u reached line %u:%u while other threads wait "
        "at line %u:%u",
        threadgroup ? "threadgroup_barrier" : "SIMD-group function or barrier",
        self, line, column, barrier.line, barrier.column);
    fail_locked(launch, text + describe_waits(launch));
    throw Abort{};
  }
  if (barrier.waiters.empty()) {
    barrier.line = line;
    barrier.column = column;
  }
  barrier.waiters.push_back(self);
  state.blocked = true;
  state.runnable = false;
  launch.blocked++;
  if (barrier.waiters.size() == barrier.expected) {
    complete_locked(launch, barrier);
  } else if (launch.blocked == launch.alive) {
    fail_locked(launch,
        "deadlock: every live thread of the threadgroup waits at a barrier "
        "or SIMD-group function that cannot complete" +
            describe_waits(launch));
    throw Abort{};
  }
  if (is_serial(launch)) {
    hand_off_locked(launch);
  }
  state.wake.wait(lock, [&] { return state.go; });
  state.go = false;
  if (launch.aborted) {
    throw Abort{};
  }
}

void finish_locked(Launch& launch, unsigned self) {
  ThreadState& state = launch.threads[self];
  state.finished = true;
  state.runnable = false;
  state.go = false;
  launch.alive--;
  launch.finished++;
  if (!launch.aborted) {
    if (!launch.threadgroup_barrier.waiters.empty()) {
      char text[200];
      std::snprintf(text, sizeof(text),
          "thread %u returned while other threads of its threadgroup wait at "
          "threadgroup_barrier (line %u); every thread must reach the barrier "
          "(undefined behaviour in Metal)",
          self, launch.threadgroup_barrier.line);
      fail_locked(launch, text + describe_waits(launch));
    } else {
      // A lane that returned is inactive: SIMD-group functions of the other
      // lanes proceed without it, as on the GPU.
      Barrier& simd = launch.simd_barriers[self / kSimdWidth];
      simd.expected--;
      if (!simd.waiters.empty() && simd.waiters.size() == simd.expected) {
        complete_locked(launch, simd);
      }
      if (launch.alive > 0 && launch.blocked == launch.alive) {
        fail_locked(launch,
            "deadlock: every live thread of the threadgroup waits at a "
            "barrier or SIMD-group function that cannot complete" +
                describe_waits(launch));
      }
    }
  }
  if (launch.alive == 0) {
    launch.group_done.notify_one();
  } else if (is_serial(launch) && !launch.aborted) {
    hand_off_locked(launch);
  }
}

void worker(Launch* launch, unsigned index) {
  t_index = index;
  ThreadState& state = launch->threads[index];
  std::unique_lock<std::mutex> lock(launch->mutex);
  for (;;) {
    state.wake.wait(lock, [&] { return state.go || launch->quit; });
    if (launch->quit) {
      return;
    }
    state.go = false;
    const bool skip = launch->aborted;
    lock.unlock();
    std::string failure;
    if (!skip) {
      try {
        metal_sim_kernel_entry(launch->buffers, &state.attributes);
      } catch (const Abort&) {
      } catch (const std::exception& error) {
        failure = std::string("exception in kernel: ") + error.what();
      } catch (...) {
        failure = "unknown exception in kernel";
      }
    }
    lock.lock();
    if (!failure.empty()) {
      fail_locked(*launch, failure);
    }
    finish_locked(*launch, index);
  }
}

unsigned ceil_div(unsigned a, unsigned b) {
  return (a + b - 1) / b;
}

// Attributes of thread `t` (linear index in its threadgroup) as Metal's
// non-uniform dispatch defines them: x fastest, threads_per_threadgroup is the
// size of this (possibly partial) threadgroup.
void set_attributes(Attributes& a, unsigned t, const unsigned grid[3],
    const unsigned dispatch[3], const unsigned group[3],
    const unsigned groups[3], const unsigned actual[3]) {
  const unsigned dispatch_total = dispatch[0] * dispatch[1] * dispatch[2];
  const unsigned total = actual[0] * actual[1] * actual[2];
  const unsigned local[3] = {
      t % actual[0], (t / actual[0]) % actual[1], t / (actual[0] * actual[1])};
  a.dispatch_quadgroups_per_threadgroup = ceil_div(dispatch_total, 4);
  a.dispatch_simdgroups_per_threadgroup = ceil_div(dispatch_total, kSimdWidth);
  a.dispatch_threads_per_threadgroup =
      abi_uint3{dispatch[0], dispatch[1], dispatch[2]};
  a.grid_origin = abi_uint3{0, 0, 0};
  a.grid_size = abi_uint3{grid[0], grid[1], grid[2]};
  a.quadgroup_index_in_threadgroup = t / 4;
  a.quadgroups_per_threadgroup = ceil_div(total, 4);
  a.simdgroup_index_in_threadgroup = t / kSimdWidth;
  a.simdgroups_per_threadgroup = ceil_div(total, kSimdWidth);
  a.thread_execution_width = kSimdWidth;
  a.thread_index_in_quadgroup = t % 4;
  a.thread_index_in_simdgroup = t % kSimdWidth;
  a.thread_index_in_threadgroup = t;
  a.thread_position_in_threadgroup = abi_uint3{local[0], local[1], local[2]};
  a.threadgroup_position_in_grid = abi_uint3{group[0], group[1], group[2]};
  a.thread_position_in_grid = abi_uint3{group[0] * dispatch[0] + local[0],
      group[1] * dispatch[1] + local[1], group[2] * dispatch[2] + local[2]};
  a.threadgroups_per_grid = abi_uint3{groups[0], groups[1], groups[2]};
  a.threads_per_grid = abi_uint3{grid[0], grid[1], grid[2]};
  a.threads_per_simdgroup = kSimdWidth;
  a.threads_per_threadgroup = abi_uint3{actual[0], actual[1], actual[2]};
}

// Runs threadgroup `id` on the pool; returns false when the launch failed.
bool run_group(Launch& launch, int64_t id, const unsigned grid[3],
    const unsigned dispatch[3], const unsigned groups[3], uint64_t seed) {
  const unsigned group[3] = {unsigned(id % groups[0]),
      unsigned((id / groups[0]) % groups[1]),
      unsigned(id / (int64_t(groups[0]) * groups[1]))};
  unsigned actual[3];
  for (int d = 0; d < 3; ++d) {
    unsigned left = grid[d] - group[d] * dispatch[d];
    actual[d] = left < dispatch[d] ? left : dispatch[d];
  }
  const unsigned total = actual[0] * actual[1] * actual[2];
  const unsigned simdgroups = ceil_div(total, kSimdWidth);
  std::unique_lock<std::mutex> lock(launch.mutex);
  launch.active = total;
  launch.alive = total;
  launch.blocked = 0;
  launch.finished = 0;
  launch.random_state = (seed ^ (uint64_t(id) * 0x9E3779B97F4A7C15ull)) | 1;
  launch.threadgroup_barrier = Barrier{};
  launch.threadgroup_barrier.expected = total;
  launch.simd_barriers.assign(simdgroups, Barrier{});
  launch.slot_masks.assign(size_t(simdgroups) * 2, 0);
  for (unsigned s = 0; s < simdgroups; ++s) {
    unsigned lanes = total - s * kSimdWidth;
    launch.simd_barriers[s].expected = lanes < kSimdWidth ? lanes : kSimdWidth;
    launch.simd_barriers[s].masks = &launch.slot_masks[size_t(s) * 2];
  }
  std::memset(launch.slots.data(), 0xFF, launch.slots.size());
  std::memset(launch.arena, 0xFF, launch.arena_bytes);
  for (unsigned t = 0; t < total; ++t) {
    ThreadState& state = launch.threads[t];
    state.go = !is_serial(launch);
    state.runnable = true;
    state.blocked = false;
    state.finished = false;
    set_attributes(
        state.attributes, t, grid, dispatch, group, groups, actual);
    if (state.go) {
      state.wake.notify_one();
    }
  }
  if (is_serial(launch)) {
    hand_off_locked(launch);
  }
  launch.group_done.wait(lock, [&] { return launch.alive == 0; });
  return !launch.aborted;
}

} // namespace

void runtime_threadgroup_barrier(unsigned line, unsigned column) {
  arrive(g_launch->threadgroup_barrier, true, line, column);
}

void runtime_simdgroup_barrier(unsigned line, unsigned column) {
  arrive(g_launch->simd_barriers[t_index / kSimdWidth], false, line, column);
}

SimdExchange runtime_simd_exchange(
    const void* value,
    unsigned size,
    unsigned line,
    unsigned column) {
  Launch& launch = *g_launch;
  const unsigned self = t_index;
  const unsigned simdgroup = self / kSimdWidth;
  const unsigned lane = self % kSimdWidth;
  Barrier& barrier = launch.simd_barriers[simdgroup];
  // Double buffering: the slots of generation g are rewritten at g + 2, which
  // every lane reaches only after all lanes finished reading generation g.
  const unsigned parity = barrier.generation & 1;
  unsigned char* row =
      &launch.slots[(size_t(simdgroup) * 2 + parity) * kSimdWidth * kSlotBytes];
  std::memcpy(row + size_t(lane) * kSlotBytes, value, size);
  arrive(barrier, false, line, column);
  return SimdExchange{
      row, launch.slot_masks[size_t(simdgroup) * 2 + parity], lane};
}

unsigned runtime_simd_lane() {
  return t_index % kSimdWidth;
}

unsigned char* runtime_threadgroup_memory() {
  // Before any launch (a namespace-scope declaration) there is no arena.
  static unsigned char no_launch[16];
  return g_launch != nullptr ? g_launch->arena : no_launch;
}

size_t register_threadgroup_slot(size_t size, size_t alignment) {
  if (alignment < 16) {
    alignment = 16;
  }
  g_threadgroup_bytes = (g_threadgroup_bytes + alignment - 1) / alignment *
      alignment;
  const size_t offset = g_threadgroup_bytes;
  g_threadgroup_bytes += size;
  return offset;
}

} // namespace metal_sim

using namespace metal_sim;

extern "C" __attribute__((visibility("default"))) int64_t
metal_sim_threadgroup_memory_bytes() {
  return int64_t(g_threadgroup_bytes);
}

// dims: grid (3) then threadgroup (3), both in threads as MLX passes them to
// dispatchThreads. groups: linear threadgroup ids (x fastest) to run, or all
// when n_groups < 0. Returns 0, or 1 with a message in `error`.
extern "C" __attribute__((visibility("default"))) int metal_sim_launch(
    void* const* buffers,
    const int64_t* dims,
    const int64_t* group_ids,
    int64_t n_groups,
    int schedule,
    uint64_t seed,
    char* error,
    int64_t error_size) {
  std::lock_guard<std::mutex> serialise(g_launch_mutex);
  unsigned grid[3], dispatch[3], groups[3];
  for (int d = 0; d < 3; ++d) {
    grid[d] = unsigned(dims[d]);
    dispatch[d] = unsigned(dims[3 + d] < dims[d] ? dims[3 + d] : dims[d]);
    groups[d] = dispatch[d] == 0 ? 0 : ceil_div(grid[d], dispatch[d]);
  }
  const int64_t total_groups = int64_t(groups[0]) * groups[1] * groups[2];
  if (total_groups == 0) {
    return 0;
  }
  const unsigned pool = dispatch[0] * dispatch[1] * dispatch[2];
  Launch launch;
  launch.buffers = buffers;
  launch.schedule = Schedule(schedule);
  launch.threads.reset(new ThreadState[pool]);
  launch.slots.assign(
      size_t(ceil_div(pool, kSimdWidth)) * 2 * kSimdWidth * kSlotBytes, 0xFF);
  launch.arena_bytes = g_threadgroup_bytes > 0 ? g_threadgroup_bytes : 16;
  launch.arena = static_cast<unsigned char*>(
      ::operator new(launch.arena_bytes, std::align_val_t(64)));
  g_launch = &launch;
  std::vector<std::thread> workers;
  workers.reserve(pool);
  for (unsigned t = 0; t < pool; ++t) {
    workers.emplace_back(worker, &launch, t);
  }
  const int64_t count = n_groups < 0 ? total_groups : n_groups;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t id = n_groups < 0 ? i : group_ids[i];
    if (!run_group(launch, id, grid, dispatch, groups, seed)) {
      break;
    }
  }
  {
    std::lock_guard<std::mutex> lock(launch.mutex);
    launch.quit = true;
    for (unsigned t = 0; t < pool; ++t) {
      launch.threads[t].wake.notify_one();
    }
  }
  for (std::thread& thread : workers) {
    thread.join();
  }
  g_launch = nullptr;
  ::operator delete(launch.arena, std::align_val_t(64));
  if (launch.aborted) {
    std::snprintf(error, size_t(error_size), "%s", launch.error.c_str());
    return 1;
  }
  return 0;
}

#include "sim_fp16.h"
