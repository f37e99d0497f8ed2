"""`serve`: build the server around a loaded model and run it with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import warnings

from .. import kernels
from .app import ServerConfig, ServerState, create_app
from .prompt_cache import PromptCache
from .scheduler import Scheduler
from .templates import TemplateRenderer

log = logging.getLogger("foundry_mlx.server")


def build_state(
    model,
    tokenizer,
    config: ServerConfig,
    max_batch: int = 8,
    max_queue: int = 32,
    prompt_cache_bytes: int = 512 << 20,
    template_timeout: float = 2.0,
    batching: str = "auto",
) -> ServerState:
    cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
    batched = batching == "on" or (batching == "auto" and kernels.gpu_backend() is not None)
    scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_queue=max_queue, prompt_cache=cache,
                          batched=batched)
    renderer = TemplateRenderer(tokenizer, timeout=template_timeout, max_chars=32 * model.config.max_position_embeddings)
    return ServerState(config, model, tokenizer, scheduler, renderer)


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run until interrupted (Ctrl-C)."""
    import faulthandler

    import uvicorn

    # A crash inside MLX or a kernel (no Python exception) would otherwise end the server without
    # a word in its log: print every thread's Python stack to stderr if that ever happens.
    if not faulthandler.is_enabled():
        faulthandler.enable()

    if not _is_loopback(host) and state.config.api_key is None:
        warnings.warn(f"serving on {host} without --api-key: anyone who can reach this address can use the model",
                      stacklevel=2)
    state.scheduler.start()
    try:
        uvicorn.run(create_app(state), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
    finally:
        state.scheduler.stop()
        state.renderer.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
