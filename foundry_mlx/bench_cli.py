"""`foundry-mlx bench`: foundry-mlx against stock mlx-lm on identical weights (the command; the
measuring lives in bench.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import kernels
from .cli import _load, main, model_options, user_errors
from .decode_paths import DECODE_STEPS, check_decode_step, select_decode_step
from .errors import FoundryError


def _int_list(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _step_name(fused) -> str:
    """The decode step a run used, for the benchmark's header."""
    if fused is None:
        return "per-op"
    return "fused, one launch per layer" if fused.kernels.layer_kernel else "fused, five kernels per layer"


@main.command()
@model_options
@click.option("--engines", default="foundry,mlx-lm", show_default=True, help="Comma-separated: foundry, mlx-lm.")
@click.option("--prompt-lengths", default="128,512,2048", show_default=True, callback=_int_list, help="Prefill lengths.")
@click.option("--depths", default="0,2048", show_default=True, callback=_int_list, help="Context depths for decode.")
@click.option("--decode-tokens", default=128, show_default=True, help="Tokens generated per decode measurement.")
@click.option("--trials", default=3, show_default=True, help="Timed trials per setting, after one warm-up.")
@click.option("--out", "out_prefix", default=None, help="Write OUT.json, OUT.md and OUT.png (the plot).")
@click.option("--decode-step", type=click.Choice(DECODE_STEPS), default="auto", show_default=True,
              help="per-op: the compiled model-file step; fused: five kernels per layer, token on the device "
                   "(off by default on Metal: flip it here on a Mac and compare); layer: one launch per layer "
                   "(CUDA's default for small models; on Metal an experiment: its FOUNDRY_LAYER_BLOCKS threadgroups, "
                   "default 16, must all stay resident); auto: the defaults.")
@click.option("--keep-buffers", is_flag=True,
              help="Keep MLX's buffer cache between timed runs (as a server's later requests and llama-bench's "
                   "repeated runs do) instead of freeing it before each, as a process's first request sees it.")
@click.option("--back-to-back", is_flag=True,
              help="Precede each timed run with an untimed run of the same engine and request, as llama-bench's "
                   "repetitions follow each other (engines still alternate by trial). A short prefill is bound by "
                   "host time and measures ~20% slower right after the other engine's run.")
@user_errors
def bench(engines: str, prompt_lengths, depths, decode_tokens: int, trials: int, out_prefix: str | None,
          decode_step: str, keep_buffers: bool, back_to_back: bool, **options) -> None:
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
    select_decode_step(decode_step)
    model, tokenizer, _ = _load(options)
    check_decode_step(decode_step, model, kernels.backend_name())
    config = benchmark.BenchConfig(prompt_lengths, depths, decode_tokens, trials, clear_cache=not keep_buffers,
                                     back_to_back=back_to_back)
    limit = max(prompt_lengths + depths) + decode_tokens + 1
    if limit > model.config.max_position_embeddings:
        raise FoundryError(f"The longest run needs {limit} positions; the model's context is {model.config.max_position_embeddings}.")
    ours = benchmark.foundry_engine(model, tokenizer)
    selected = [ours] if "foundry" in wanted else []
    with tempfile.TemporaryDirectory(prefix="foundry-bench-") as scratch:
        if "mlx-lm" in wanted:
            directory = model.source if Path(model.source).is_dir() else save_directory(model, tokenizer, Path(scratch) / "mlx", progress=False)
            selected.append(benchmark.mlx_lm_engine(directory, ours.weight_bytes, ours.kv_bytes_per_position,
                                                   ours.flops))
        measurements = benchmark.run(selected, config, model.config.vocab_size, log=lambda line: click.echo(line, err=True))
    from .engine.decoder import fused_decoder_for, step_nodes

    nodes = step_nodes(model)
    meta = {**benchmark.machine_info(), "model": str(model.source), "command": "foundry-mlx " + shlex.join(sys.argv[1:]),
            "weight_bytes_per_token": ours.weight_bytes, "decode_step": _step_name(fused_decoder_for(model)),
            "graph_nodes_per_token": nodes, "config": vars(config)}
    text = benchmark.table(measurements)
    click.echo(f"foundry-mlx decode step: {meta['decode_step']}, {nodes} graph nodes per token "
               f"({model.config.num_hidden_layers} layers)")
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
