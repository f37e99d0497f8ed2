"""Start the ranks of a distributed run on 127.0.0.1 (ring backend) for the tests; not a test module.

Only loopback addresses are ever written into the hostfile, and every run has a hard timeout, so a
hung collective fails a test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def free_loopback_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_ranks(commands: list[list[str]], directory: Path, timeout: float, size: int | None = None) -> list[Finished]:
    """Run `commands[r]` as rank r of a group of `size` (default: one per command); kill all on timeout."""
    size = size or len(commands)
    hostfile = directory / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_loopback_ports(size)]))
    processes = []
    for rank, command in enumerate(commands):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(ROOT)}
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    finished = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            finished.append(Finished(process.returncode, out, err))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.communicate()
        raise AssertionError(f"a rank did not finish within {timeout} s (a hung collective?)") from None
    return finished
