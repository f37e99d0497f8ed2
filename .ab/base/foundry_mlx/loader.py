"""`load(name)`: a model name or path in, a ready (model, tokenizer) out."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from . import device_memory, models, sources
from .errors import ModelFormatError
from .formats.gguf import GGUFFile
from .formats.gguf_model import read_config, read_weights

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> mx.Dtype:
    """float16 on a GPU; float32 on the CPU, where MLX emulates half precision in software
    (measured: 4-bit matmuls with float16 scales decode at 0.04 tok/s there, float32 at 1.7)."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def load(
    name: str = sources.DEFAULT_MODEL,
    dtype: str | mx.Dtype | None = None,
    progress: bool = True,
    exact: bool = False,
    chat_template: str | None = None,
    group: mx.distributed.Group | None = None,
    parallel: str = "tensor",
):
    """Load a model by alias, path, or hub id; returns `(model, tokenizer)`.

    `dtype` is the compute dtype of activations, dense weights and quantization scales
    ("float32", "float16", "bfloat16"; default: `default_dtype()`). `exact=True` keeps the GGUF
    types that have only a near affine form (Q6_K, Q2_K, Q3_K, IQ*) dense: exact, but larger.
    `chat_template` replaces the model's own: a built-in name (`chatml`, `gemma`), a Jinja file or
    Jinja source; a model without one (a base model) needs it for `apply_chat_template`.
    With `group=mx.distributed.init()` of more than one process, each rank loads only its part:
    `parallel="tensor"` (every layer split over the ranks) or `"pipeline"` (a range of layers each);
    every rank then runs the same generate calls, with the same sampling seed.
    """
    model, tokenizer = _load(name, dtype, progress, exact, group, parallel)
    device_memory.into_device_memory(model)
    if chat_template is not None:
        tokenizer.set_chat_template(chat_template)
    return model, tokenizer


def _load(name: str, dtype: str | mx.Dtype | None, progress: bool, exact: bool,
          group: mx.distributed.Group | None, parallel: str):
    from .tokenizer import Tokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelFormatError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype()
    make_plan = None
    if group is not None and group.size() > 1:
        from . import distributed

        make_plan = distributed.planner(group, parallel)
    path = sources.resolve(name)
    if path.is_dir():
        from .formats.mlx_dir import load_directory

        return load_directory(path, dtype, progress, make_plan)
    if path.suffix != ".gguf" and not _looks_like_gguf(path):
        raise ModelFormatError(f"{path} is neither a .gguf file nor a model directory.")
    gguf = GGUFFile(path)
    config = read_config(gguf)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    plan = make_plan(config) if make_plan else None
    weights = read_weights(gguf, config, dtype, progress, exact, plan)
    model = plan.build(config, weights) if plan else models.build(config, weights)
    model.source = path
    return model, tokenizer


def _looks_like_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"
