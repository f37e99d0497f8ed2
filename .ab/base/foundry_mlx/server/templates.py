"""Chat templates rendered under limits: a time limit, an output size cap and a memory cap.

A chat template is Jinja code from the model file, and messages come from anyone who can reach the
server. The sandbox (`tokenizer/chat_template.py`) stops escapes, but not a loop of 10^10
iterations or a string doubled forty times. So rendering runs in a child process: it gets the
messages, renders with the tokenizer's own `apply_chat_template`, and answers within
`timeout` seconds, or it is killed (and a fresh one started for the next request). Its address
space is capped with RLIMIT_AS, so a runaway template ends in MemoryError, not in a swapping host.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

from ..errors import FoundryError


class TemplateLimitError(FoundryError):
    """A chat template ran past its time, output or memory limit."""


class TemplateRenderer:
    def __init__(self, tokenizer, timeout: float = 2.0, max_chars: int = 1 << 22, memory_bytes: int = 1 << 28) -> None:
        self.tokenizer = tokenizer
        self.timeout, self.max_chars, self.memory_bytes = timeout, max_chars, memory_bytes
        # A fork server starts once with the tokenizer's modules imported; each worker is then a
        # cheap fork of it (a fresh interpreter would take seconds to import MLX on a slow CPU).
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["foundry_mlx.tokenizer", "foundry_mlx.server.templates"])
        self._lock = threading.Lock()
        self._process = None
        self._connection = None

    def render(self, messages: list[dict[str, Any]], **variables: Any) -> str:
        """The prompt text for `messages` (with the generation prompt); FoundryError on failure."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            try:
                self._connection.send((messages, variables))
                if not self._connection.poll(self.timeout):
                    self._kill()
                    raise TemplateLimitError(
                        f"Rendering the chat template took longer than {self.timeout:g} s for these messages; "
                        "send shorter or fewer messages."
                    )
                status, value = self._connection.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                self._kill()
                raise TemplateLimitError(
                    "Rendering the chat template crashed on these messages; send shorter or fewer messages."
                ) from None
        if status == "ok":
            return value
        raise (TemplateLimitError if status == "limit" else FoundryError)(value)

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(
            target=_serve,
            args=(child, self.tokenizer, self.max_chars, self.memory_bytes),
            name="foundry-template",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._connection = parent

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=5)
        if self._connection is not None:
            self._connection.close()
        self._process = self._connection = None

    def close(self) -> None:
        with self._lock:
            self._kill()


def _serve(connection, tokenizer, max_chars: int, memory_bytes: int) -> None:
    """The child process: render each (messages, variables) it receives, until the pipe closes."""
    _cap_memory(memory_bytes)
    while True:
        try:
            messages, variables = connection.recv()
        except EOFError:
            return
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **variables)
            if len(text) > max_chars:
                reply = ("limit", f"The rendered chat prompt is longer than {max_chars} characters; send shorter messages.")
            else:
                reply = ("ok", text)
        except FoundryError as error:
            reply = ("error", str(error))
        except MemoryError:
            text = None
            reply = ("limit", "Rendering the chat template ran out of its memory budget; send shorter or fewer messages.")
        except RecursionError:
            reply = ("limit", "The chat template recursed too deeply on these messages; send simpler messages.")
        except Exception as error:  # noqa: BLE001 - the template's own failure, reported to the client
            reply = ("error", f"The model's chat template failed ({type(error).__name__}); check the messages.")
        connection.send(reply)


def _cap_memory(extra_bytes: int) -> None:
    try:
        import resource

        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, size + extra_bytes))
    except (ImportError, OSError, ValueError, StopIteration):
        pass  # not Linux: the time limit still holds
