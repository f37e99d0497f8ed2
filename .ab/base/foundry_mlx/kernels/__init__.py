"""Custom GPU kernels and the choice between them and the reference path.

The backend is chosen once: Metal if MLX has it, else CUDA, else the reference path (plain
`mlx` ops). `FOUNDRY_KERNELS=reference|custom|auto` or `set_mode()` (the CLI's `--kernels`)
overrides the choice; `custom` on a machine with no GPU backend is an error, not a silent fallback.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..errors import FoundryError

MODES = ("auto", "custom", "reference")
_mode = os.environ.get("FOUNDRY_KERNELS", "auto")
_active = None
_resolved = False


def gpu_backend() -> str | None:
    """'metal' or 'cuda' where MLX has that GPU backend, else None."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def set_mode(mode: str) -> None:
    """Choose `auto`, `custom` or `reference` kernels for what runs next in this process."""
    global _mode, _resolved
    if mode not in MODES:
        raise FoundryError(f"Unknown kernel mode {mode!r}; use one of {', '.join(MODES)}.")
    _mode, _resolved = mode, False


def mode() -> str:
    return _mode


def active():
    """The kernel set in use, or None for the reference path."""
    global _active, _resolved
    if not _resolved:
        _active, _resolved = _select(), True
    return _active


def _select():
    if _mode not in MODES:
        raise FoundryError(f"FOUNDRY_KERNELS={_mode!r} is not one of {', '.join(MODES)}.")
    if _mode == "reference":
        return None
    backend = gpu_backend()
    if backend is None:
        if _mode == "custom":
            raise FoundryError(
                "Custom kernels need MLX's Metal or CUDA backend and this MLX has neither; "
                "use --kernels reference (or auto)."
            )
        return None
    from .decode import KernelSet

    return KernelSet(backend)


def backend_name() -> str:
    """What runs the decode step: 'metal', 'cuda' or 'reference'."""
    kernel_set = active()
    return "reference" if kernel_set is None else kernel_set.backend
