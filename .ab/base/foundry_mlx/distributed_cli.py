"""The command line's side of a distributed run: options, joining the group, one speaking rank,
and stopping with a clear error instead of hanging.

    mlx.launch --backend ring --hostfile hosts.json -- foundry-mlx chat -p "hi" --distributed tensor

Every rank runs the same command. Rank 0 prints; the others print nothing but their own errors.
Interactive chat: rank 0 reads each line and sends it to the others (mpirun gives only rank 0 a
stdin). What happens when a rank fails, measured on the ring backend (2 processes, loopback):

* a rank that exits (an error, Ctrl-C, killed) closes its sockets, and the next collective on the
  others raises "[ring] connection to a peer was lost" within ~0.03 s; that becomes one line
  saying which rank to look at;
* a rank that never joins, or stops answering without exiting (a hung process, a dropped link),
  blocks the others forever: `mx.distributed.init` waits for every peer, and collectives have no
  timeout. A guard ends this process when joining (exit 143) or one generation step (a watchdog
  thread, exit 1) takes longer than `--distributed-timeout` seconds; its exit in turn stops the
  other ranks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import click
import mlx.core as mx
import numpy as np

from . import distributed
from .errors import FoundryError

LAUNCHER_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # mlx.launch (ring, nccl), mpirun


def options(command: Callable) -> Callable:
    """The --distributed options of `chat` and `generate`."""
    added = [
        click.option(
            "--distributed",
            type=click.Choice(distributed.STRATEGIES),
            default=None,
            help="Split the model over the processes mlx.launch started: tensor (every layer split; "
            "fast links) or pipeline (a range of layers per process; for models too big for one "
            "device). Default: tensor when started by mlx.launch, else one process.",
        ),
        click.option(
            "--distributed-backend",
            type=click.Choice(distributed.BACKENDS),
            default="any",
            show_default=True,
            help="mx.distributed backend (ring: TCP, Thunderbolt/Ethernet; nccl: NVIDIA GPUs; mpi).",
        ),
        click.option(
            "--distributed-timeout",
            type=float,
            default=300.0,
            show_default=True,
            help="Seconds to wait for the other ranks to join, or for one generation step (the first one "
            "includes the prompt's prefill: raise it for long prompts on slow devices), before stopping.",
        ),
    ]
    for option in reversed(added):
        command = option(command)
    return command


@dataclass
class Run:
    """This process's place in a distributed run."""

    group: mx.distributed.Group
    parallel: str
    timeout: float

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def primary(self) -> bool:
        return self.group.rank() == 0


def join(options: dict) -> Run | None:
    """Join the group when asked to or started by a launcher; None for a single process.

    Removes the distributed options from `options` and sets its "seed" to rank 0's, so every rank
    samples the same tokens. On ranks other than 0, standard output is silenced from here on."""
    parallel = options.pop("distributed", None)
    backend = options.pop("distributed_backend", "any")
    timeout = options.pop("distributed_timeout", 300.0)
    if parallel is None and not any(v in os.environ for v in LAUNCHER_VARIABLES):
        return None
    with _joining_guard(timeout):
        group = distributed.init(backend)
    if group.size() == 1:
        if parallel is not None:
            raise FoundryError(
                "--distributed needs several processes; start them with mlx.launch "
                "(e.g. `mlx.launch --backend ring -n 2 -- foundry-mlx chat --distributed tensor`)."
            )
        return None
    run = Run(group, parallel or "tensor", timeout)
    WATCHDOG.rank = run.rank
    if "seed" in options:
        with _peer_errors(run):
            options["seed"] = distributed.agree_seed(options["seed"], group)
    if not run.primary:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return run


def steps(run: Run | None, responses: Iterable) -> Iterator:
    """The responses of a generation, each step under the watchdog; a lost peer becomes one line."""
    if run is None:
        yield from responses
        return
    iterator = iter(responses)
    while True:
        try:
            with _peer_errors(run), WATCHDOG.armed(run.timeout, "waiting for the other ranks during generation"):
                response = next(iterator)
        except StopIteration:
            return
        yield response


@contextlib.contextmanager
def _peer_errors(run: Run) -> Iterator[None]:
    """A collective that failed because another rank is gone, as one line for the user."""
    try:
        yield
    except RuntimeError as error:
        if not any(mark in str(error) for mark in ("[ring]", "peer", "NCCL", "MPI")):
            raise
        raise FoundryError(
            f"rank {run.rank}: another rank stopped ({error}); see its error above, then relaunch all ranks."
        ) from None


def read_line(run: Run | None, prompt: str) -> str | None:
    """A line of user input (None at end of input): read by rank 0, sent to the other ranks."""
    if run is None:
        return _input(prompt)
    return _share_text(run, _input(prompt) if run.primary else None)


def read_all(run: Run | None) -> str:
    """All of standard input (`--prompt -`): read by rank 0, sent to the other ranks."""
    if run is None:
        return sys.stdin.read()
    return _share_text(run, sys.stdin.read() if run.primary else None) or ""


def _share_text(run: Run, text: str | None) -> str | None:
    """Rank 0's text (or None) on every rank: two all-reduces, the length and the bytes."""
    data = np.frombuffer(text.encode(), dtype=np.uint8) if text is not None else np.zeros(0, np.uint8)
    length = mx.array(len(data) + 1 if run.primary and text is not None else 0, dtype=mx.int32)
    length = int(mx.distributed.all_sum(length, group=run.group).item())  # 0: end of input
    if length == 0:
        return None
    mine = mx.array(data.astype(np.int32)) if run.primary else mx.zeros((length - 1,), dtype=mx.int32)
    received = np.array(mx.distributed.all_sum(mine, group=run.group)).astype(np.uint8)
    return received.tobytes().decode()


@contextlib.contextmanager
def _joining_guard(seconds: float) -> Iterator[None]:
    """Ends this process if joining takes longer than `seconds`. `mx.distributed.init` waits for its
    peers without releasing Python's lock, so no thread can act meanwhile: a small `sh` process
    prints the error and terminates this one (exit status 143), unless we are done first."""
    message = (
        f"error: no other rank joined within {seconds:g} s; start every rank with mlx.launch and the same "
        "hostfile, or raise --distributed-timeout."
    )
    pid = os.getpid()
    script = f'sleep {seconds}; [ "$(ps -o ppid= -p $$ | tr -d " ")" = "{pid}" ] && printf "%s\\n" "$1" >&2 && kill -TERM {pid}'
    guard = subprocess.Popen(
        ["sh", "-c", script, "sh", message], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield
    finally:  # its own process group: `sleep` goes too, and with it our inherited stderr
        os.killpg(guard.pid, signal.SIGKILL)
        guard.wait()


def _input(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


class _Watchdog:
    """Ends the process when an armed deadline passes (collectives cannot be interrupted)."""

    def __init__(self) -> None:
        self.rank: int | None = None
        self._deadline: float | None = None
        self._what = ""
        self._seconds = 0.0
        self._thread: threading.Thread | None = None

    def armed(self, seconds: float, what: str) -> _Armed:
        return _Armed(self, seconds, what)

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                who = f"rank {self.rank}: " if self.rank is not None else ""
                sys.__stderr__.write(
                    f"error: {who}no progress for {self._seconds:g} s while {self._what}; stopping. "
                    "Check the other ranks' output, or raise --distributed-timeout.\n"
                )
                sys.__stderr__.flush()
                os._exit(1)


class _Armed:
    def __init__(self, watchdog: _Watchdog, seconds: float, what: str) -> None:
        self.watchdog, self.seconds, self.what = watchdog, seconds, what

    def __enter__(self) -> None:
        dog = self.watchdog
        if dog._thread is None:
            dog._thread = threading.Thread(target=dog._watch, name="foundry-watchdog", daemon=True)
            dog._thread.start()
        dog._what, dog._seconds = self.what, self.seconds
        dog._deadline = time.monotonic() + self.seconds

    def __exit__(self, *exc) -> None:
        self.watchdog._deadline = None


WATCHDOG = _Watchdog()
