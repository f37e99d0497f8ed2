"""Running a Metal kernel on the CPU with ``mx.fast.metal_kernel`` semantics."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import signal
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from foundry_mlx.kernels.metal_sim.build import load_kernel_library
from foundry_mlx.kernels.metal_sim.dtypes import (
    dtype_name,
    filled_bytes,
    kernel_input,
    output_array,
    storage_dtype,
)
from foundry_mlx.kernels.metal_sim.rewrite import driver_source
from foundry_mlx.kernels.metal_sim.signature import InputInfo, build_kernel_source

# Metal's usual maxTotalThreadsPerThreadgroup and threadgroup memory size.
MAX_THREADS_PER_THREADGROUP = 1024
MAX_THREADGROUP_MEMORY = 32768
# Guard bytes around every buffer, filled with 0xFF: reads past the end see
# NaN/-1 and writes past the end are reported.
REDZONE_BYTES = 4096
SCHEDULES = {"concurrent": 0, "forward": 1, "reverse": 2, "random": 3}


class MetalRuntimeError(RuntimeError):
    """The simulated launch failed: deadlock, divergent barrier or SIMD-group
    function, barrier after a return, or a write outside an output buffer."""


@dataclass
class _Buffer:
    label: str
    memory: np.ndarray  # uint8, redzone + payload + redzone
    size: int

    @property
    def payload(self) -> np.ndarray:
        return self.memory[REDZONE_BYTES : REDZONE_BYTES + self.size]

    @property
    def address(self) -> int:
        return self.memory.ctypes.data + REDZONE_BYTES

    def redzones_intact(self) -> bool:
        return bool(
            (self.memory[:REDZONE_BYTES] == 0xFF).all() and (self.memory[REDZONE_BYTES + self.size :] == 0xFF).all()
        )


def _buffer(label: str, payload: np.ndarray, shared: bool = False) -> _Buffer:
    raw = np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
    # 64 spare bytes let the payload start on a 64-byte boundary.
    if shared:  # an anonymous shared mapping: what forked processes write, every process sees
        memory = np.frombuffer(mmap.mmap(-1, raw.size + 2 * REDZONE_BYTES + 64), dtype=np.uint8)
        memory[:] = 0xFF
    else:
        memory = np.full(raw.size + 2 * REDZONE_BYTES + 64, 0xFF, dtype=np.uint8)
    shift = (-(memory.ctypes.data + REDZONE_BYTES)) % 64
    memory = memory[shift : shift + raw.size + 2 * REDZONE_BYTES]
    memory[REDZONE_BYTES : REDZONE_BYTES + raw.size] = raw
    return _Buffer(label, memory, raw.size)


def _dims(value: Sequence[int], label: str) -> tuple[int, int, int]:
    dims = tuple(int(v) for v in value)
    if len(dims) != 3 or min(dims) < 0:
        raise ValueError(f"{label} must be three non-negative ints, got {value!r}")
    return dims  # type: ignore[return-value]


def run_metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str,
    inputs: Sequence[Any],
    output_shapes: Sequence[Sequence[int]],
    output_dtypes: Sequence[Any],
    grid: Sequence[int],
    threadgroup: Sequence[int],
    template: Sequence[tuple[str, Any]] = (),
    init_value: float | None = None,
    groups: Iterable[int] | None = None,
    *,
    atomic_outputs: bool = False,
    schedule: str = "concurrent",
    seed: int = 0,
    verbose: bool = False,
    written_inputs: Sequence[str] = (),
    groups_at_once: bool = False,
    timeout_s: float = 120.0,
) -> list[np.ndarray]:
    """Compile the kernel MLX would build and run it, one OS thread per GPU
    thread, threadgroup after threadgroup.

    Arguments mean what they mean for ``mx.fast.metal_kernel(...)(...)``:
    ``grid`` and ``threadgroup`` count threads (dispatchThreads; threadgroup
    dims are min(threadgroup, grid) per axis, edge threadgroups are partial).
    Outputs start as poison (all bits set for float outputs, i.e. NaN; 0xAB
    bytes for integer and bool outputs) unless ``init_value`` is given.
    bfloat16 inputs are :class:`BFloat16Array` or ml_dtypes arrays; bfloat16
    outputs come back as :class:`BFloat16Array` (uint16 bits).

    ``groups``: linear threadgroup ids (x fastest) to run; the others are
    skipped and only outputs written by the chosen groups are meaningful.

    ``schedule``: ``"concurrent"`` lets all threads of a threadgroup run freely
    (real OS-level interleaving). ``"forward"``, ``"reverse"`` and
    ``"random"`` (with ``seed``) run one thread at a time, switching only at
    barriers and SIMD-group functions, in thread-index, reverse or random
    order: a correct kernel gives the same result under every schedule, a
    kernel missing a barrier between SIMD-groups does not.

    ``written_inputs``: names of inputs the kernel writes in place (a KV cache); their
    contents after the launch come back after the outputs, in this order.
    ``groups_at_once``: every threadgroup (at most MAX_GROUPS_AT_ONCE) runs at the same time, each
    in a process of its own over buffers all of them share, as a GPU keeps a small grid resident:
    a kernel whose threadgroups wait for one another (a grid-wide barrier on a device atomic)
    completes, and one whose barrier is wrong reads what another group has not yet written. One
    that never completes is killed after ``timeout_s`` and reported.

    Raises MetalCompileError (clang's message) or MetalRuntimeError.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}")
    for label, actual, expected in (
        ("inputs", len(inputs), len(input_names)),
        ("output_shapes", len(output_shapes), len(output_names)),
        ("output_dtypes", len(output_dtypes), len(output_names)),
    ):
        if actual != expected:
            raise ValueError(f"[metal_kernel] Expected `{label}` to have size {expected} but got size {actual}.")
    grid_dims = _dims(grid, "grid")
    group_dims = _dims(threadgroup, "threadgroup")
    if math.prod(group_dims) > MAX_THREADS_PER_THREADGROUP:
        raise ValueError(
            f"Thread group size ({math.prod(group_dims)}) is greater than the "
            f"maximum allowed threads per threadgroup ({MAX_THREADS_PER_THREADGROUP})."
        )
    if 0 in group_dims:
        raise ValueError("threadgroup dims must be positive")

    converted = [kernel_input(value) for value in inputs]
    output_dtype_names = [dtype_name(dtype) for dtype in output_dtypes]
    kernel = build_kernel_source(
        name,
        input_names,
        output_names,
        source,
        header,
        [InputInfo(d, a.ndim, int(a.size)) for d, a in converted],
        output_dtype_names,
        template,
        atomic_outputs,
    )
    if verbose:
        print(f"Generated source code for `{name}`:\n```\n{kernel.source}\n```")
    library = load_kernel_library(driver_source(kernel), kernel.kernel_name)
    memory_bytes = library.metal_sim_threadgroup_memory_bytes()
    if memory_bytes > MAX_THREADGROUP_MEMORY:
        raise ValueError(
            f"kernel {kernel.kernel_name} declares {memory_bytes} bytes of "
            f"threadgroup memory; Metal allows {MAX_THREADGROUP_MEMORY}"
        )

    buffers: list[_Buffer] = []
    outputs: list[_Buffer] = []
    written: dict[str, tuple[_Buffer, np.ndarray]] = {}
    for parameter in kernel.parameters:
        if parameter.kind == "attribute":
            continue
        if parameter.kind == "output":
            shape = tuple(int(d) for d in output_shapes[parameter.index])
            dtype = output_dtype_names[parameter.index]
            count = math.prod(shape)
            buffer = _buffer(parameter.name, filled_bytes(dtype, count, init_value), groups_at_once)
            outputs.append(buffer)
        else:
            array = converted[parameter.index][1]
            if parameter.kind == "input":
                payload = array
            elif parameter.kind == "shape":
                payload = np.array(array.shape, dtype=np.int32)
            elif parameter.kind == "strides":
                strides = [s // array.itemsize for s in array.strides]
                payload = np.array(strides, dtype=np.int64)
            else:
                payload = np.array(array.ndim, dtype=np.int32)
            buffer = _buffer(parameter.name, payload, groups_at_once)
            if parameter.kind == "input" and parameter.name in written_inputs:
                written[parameter.name] = (buffer, array)
        buffers.append(buffer)

    dims = (ctypes.c_int64 * 6)(*grid_dims, *group_dims)
    pointers = (ctypes.c_void_p * max(len(buffers), 1))(*[b.address for b in buffers])
    ids = None
    count = -1
    total = math.prod(-(-g // min(t, g)) if g else 0 for g, t in zip(grid_dims, group_dims, strict=True))
    if groups is not None:
        id_array = np.asarray(list(groups), dtype=np.int64).reshape(-1)
        if id_array.size and (id_array.min() < 0 or id_array.max() >= total):
            raise ValueError(f"group ids must lie in [0, {total})")
        ids = id_array.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
        count = int(id_array.size)
    if groups_at_once:
        chosen = list(groups) if groups is not None else list(range(total))
        _launch_at_once(library, kernel.kernel_name, pointers, dims, chosen, SCHEDULES[schedule], seed, timeout_s)
    else:
        message = ctypes.create_string_buffer(4096)
        status = library.metal_sim_launch(pointers, dims, ids, count, SCHEDULES[schedule], seed, message, len(message))
        if status != 0:
            raise MetalRuntimeError(f"kernel {kernel.kernel_name}: {message.value.decode(errors='replace')}")
    damaged = [b.label for b in buffers if not b.redzones_intact()]
    if damaged:
        raise MetalRuntimeError(f"kernel {kernel.kernel_name} wrote outside buffer(s) {', '.join(damaged)}")
    results = []
    for buffer, shape, dtype in zip(outputs, output_shapes, output_dtype_names, strict=True):
        storage = buffer.payload.copy().view(storage_dtype(dtype))
        results.append(output_array(dtype, storage.reshape(tuple(shape))))
    for name in written_inputs:
        buffer, array = written[name]
        results.append(buffer.payload.copy().view(array.dtype).reshape(array.shape))
    return results


MAX_GROUPS_AT_ONCE = 64
_MESSAGE_BYTES = 1024


def _launch_at_once(library, name: str, pointers, dims, chosen: list[int], schedule: int, seed: int,
                    timeout_s: float) -> None:
    """Run each threadgroup of `chosen` in a forked process of its own, all at once (the buffers
    are shared mappings); wait for all of them, killing them after `timeout_s`."""
    if len(chosen) > MAX_GROUPS_AT_ONCE:
        raise ValueError(f"groups_at_once runs each threadgroup in a process: at most {MAX_GROUPS_AT_ONCE}, "
                         f"got {len(chosen)}; launch a smaller grid")
    reports = np.frombuffer(mmap.mmap(-1, len(chosen) * _MESSAGE_BYTES), dtype=np.uint8)
    children: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads alive: the child only runs the launch
        for index, group in enumerate(chosen):
            pid = os.fork()
            if pid == 0:  # the child: one threadgroup, its error text into the shared reports
                status = 1
                try:
                    ids = (ctypes.c_int64 * 1)(group)
                    message = ctypes.create_string_buffer(_MESSAGE_BYTES)
                    status = library.metal_sim_launch(pointers, dims, ids, 1, schedule, seed, message, _MESSAGE_BYTES)
                    if status:
                        text = message.value[: _MESSAGE_BYTES - 1]
                        reports[index * _MESSAGE_BYTES : index * _MESSAGE_BYTES + len(text)] = np.frombuffer(text, np.uint8)
                finally:
                    os._exit(1 if status else 0)
            children[pid] = index
    deadline = time.monotonic() + timeout_s
    failed: list[str] = []
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if time.monotonic() > deadline:
                for child in children:
                    os.kill(child, signal.SIGKILL)
                    os.waitpid(child, 0)
                stuck = sorted(chosen[i] for i in children.values())
                raise MetalRuntimeError(f"kernel {name}: threadgroups {stuck} did not finish within {timeout_s:.0f} s "
                                        "(a grid-wide barrier that never completes?)")
            time.sleep(0.005)
            continue
        index = children.pop(pid)
        if status != 0:
            text = bytes(reports[index * _MESSAGE_BYTES : (index + 1) * _MESSAGE_BYTES]).split(b"\0")[0]
            failed.append(f"threadgroup {chosen[index]}: {text.decode(errors='replace') or 'crashed'}")
    if failed:
        raise MetalRuntimeError(f"kernel {name}: " + "; ".join(failed))
