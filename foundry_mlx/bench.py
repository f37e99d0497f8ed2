"""Side-by-side benchmarks of foundry-mlx and stock mlx-lm on identical weights.

Both engines are driven through their public streaming APIs with the same random prompt ids and
timed by the same clock here: prefill speed is prompt length / time to first token; decode speed
is (tokens - 1) / (time of the last token - time of the first), end-of-sequence ignored. Trials
interleave the engines (foundry, mlx-lm, foundry, …) so drift in clocks or temperature hits both.
With `back_to_back`, each timed run follows an untimed run of the same engine and request, as
llama-bench's repetitions follow each other: a short prefill is bound by host time, and right after
the other engine's run it measured ~20% slower (CPU caches and branch history holding the other
engine's path: 0.5B pp128 23,680 alone against 19,203 after an mlx-lm run, H200,
benchmarks/results/h200-bench-interference-04f9370.txt).
Achieved bandwidth is the bytes one decode step must read (every weight once, one embedding row,
the KV cache at that depth) times tokens per second; a prefill's achieved rate is its arithmetic
(`prefill_flops`) over the time to first token, in TFLOP/s.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import __version__, kernels
from .config import prefill_flops


@dataclass
class BenchConfig:
    prompt_lengths: tuple[int, ...] = (128, 512, 2048)
    depths: tuple[int, ...] = (0, 2048)
    decode_tokens: int = 128
    trials: int = 3
    seed: int = 0
    # Free MLX's buffer cache before each timed run (every run then allocates its buffers afresh,
    # as a process's first request does); False keeps them, as a server's later requests and
    # llama-bench's repeated runs do.
    clear_cache: bool = True
    # An untimed run of the same engine and request right before each timed one (see the docstring).
    back_to_back: bool = False


@dataclass
class Measurement:
    engine: str
    kind: str  # "prefill" or "decode"
    length: int  # prompt length (prefill) or context depth (decode)
    tokens_per_second: list[float] = field(default_factory=list)
    time_to_first_token: list[float] = field(default_factory=list)
    peak_memory_gb: list[float] = field(default_factory=list)
    bandwidth_gb_s: list[float] = field(default_factory=list)
    tflops: list[float] = field(default_factory=list)  # prefill only

    def summary(self) -> dict:
        tps = self.tokens_per_second
        return {"min": min(tps), "median": statistics.median(tps), "max": max(tps)}


class Engine:
    """One engine's model and its streaming call, reduced to what the benchmark needs."""

    def __init__(self, name: str, model, stream: Callable[[list[int], int], object], weight_bytes: int,
                 kv_bytes_per_position: int, flops: Callable[[int], float] | None = None):
        self.name = name
        self.model = model
        self.stream = stream  # (prompt ids, max tokens) -> iterator of responses
        self.weight_bytes = weight_bytes
        self.kv_bytes_per_position = kv_bytes_per_position
        self.flops = flops  # prompt length -> arithmetic of its prefill (None: not reported)


def decode_weight_bytes(model, tied_embeddings: bool) -> int:
    """Bytes of weights one decode step reads: every array once (shared ones once); of the
    embedding table only one row, unless it is also the LM head (tied), then all of it."""
    from mlx.utils import tree_flatten

    seen, total = set(), 0
    for name, array in tree_flatten(model.parameters()):
        if id(array) in seen:
            continue
        seen.add(id(array))
        if "embed_tokens" in name and not tied_embeddings and array.ndim > 1:
            total += array.nbytes // array.shape[0]
        else:
            total += array.nbytes
    return total


def foundry_engine(model, tokenizer) -> Engine:
    from .engine.generate import stream_generate

    config = model.config
    dtype_bytes = model.norm_weight.dtype.size
    weight_bytes = decode_weight_bytes(model, config.tie_word_embeddings)
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes

    def stream(ids: list[int], max_tokens: int):
        return stream_generate(model, tokenizer, ids, max_tokens=max_tokens, ignore_eos=True)

    return Engine(f"foundry-mlx ({kernels.backend_name()})", model, stream, weight_bytes, kv,
                  lambda length: prefill_flops(config, length))


def mlx_lm_engine(path: Path, weight_bytes: int, kv_bytes_per_position: int,
                  flops: Callable[[int], float] | None = None) -> Engine:
    import mlx_lm
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(path))
    tokenizer.eos_token_ids = set()  # EOS ignored, as for foundry-mlx
    sampler = make_sampler(0.0)

    def stream(ids: list[int], max_tokens: int):
        return stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=sampler)

    return Engine("mlx-lm", model, stream, weight_bytes, kv_bytes_per_position, flops)


def _timed_stream(engine: Engine, ids: list[int], max_tokens: int,
                  clear_cache: bool = True) -> tuple[float, float, int, float]:
    """(time to first token, time from first to last token, tokens, peak GB) of one run."""
    if clear_cache:
        mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = last = None
    count = 0
    for _ in engine.stream(ids, max_tokens):
        now = time.perf_counter()
        first = now if first is None else first
        last = now
        count += 1
    return first - start, last - first, count, mx.get_peak_memory() / 1e9


def run(engines: list[Engine], config: BenchConfig, vocab_size: int, log: Callable[[str], None] = print) -> list[Measurement]:
    rng = np.random.default_rng(config.seed)
    # Ids from the lower half of the vocabulary: real tokens, never special ones.
    prompt = rng.integers(0, vocab_size // 2, size=max(config.prompt_lengths + config.depths + (1,))).tolist()
    results: dict[tuple, Measurement] = {}

    def record(engine: Engine, kind: str, length: int, tps: float, ttft: float, peak: float) -> None:
        m = results.setdefault((engine.name, kind, length), Measurement(engine.name, kind, length))
        m.tokens_per_second.append(tps)
        m.time_to_first_token.append(ttft)
        m.peak_memory_gb.append(peak)
        m.bandwidth_gb_s.append((engine.weight_bytes + engine.kv_bytes_per_position * length) * tps / 1e9)
        if kind == "prefill" and engine.flops is not None:
            m.tflops.append(engine.flops(length) / ttft / 1e12)

    log("warming up (first calls compile kernels)")
    for engine in engines:
        for length in config.prompt_lengths:
            _timed_stream(engine, prompt[:length], 2, config.clear_cache)
        for depth in config.depths:
            _timed_stream(engine, prompt[: max(depth, 1)], 4, config.clear_cache)
    for trial in range(config.trials):
        for engine in engines:  # interleaved: every trial runs each engine once per setting
            for length in config.prompt_lengths:
                if config.back_to_back:
                    _timed_stream(engine, prompt[:length], 1, config.clear_cache)
                ttft, _, _, peak = _timed_stream(engine, prompt[:length], 1, config.clear_cache)
                record(engine, "prefill", length, length / ttft, ttft, peak)
                log(f"trial {trial + 1} {engine.name:28s} prefill {length:5d}: {length / ttft:9.1f} tok/s")
            for depth in config.depths:
                if config.back_to_back:
                    _timed_stream(engine, prompt[: max(depth, 1)], config.decode_tokens + 1, config.clear_cache)
                ttft, span, count, peak = _timed_stream(engine, prompt[: max(depth, 1)], config.decode_tokens + 1,
                                                        config.clear_cache)
                tps = (count - 1) / span
                record(engine, "decode", depth, tps, ttft, peak)
                log(f"trial {trial + 1} {engine.name:28s} decode @{depth:5d}: {tps:9.1f} tok/s")
    return list(results.values())


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "backend": kernels.gpu_backend() or "cpu",
        "kernels": kernels.backend_name(),
        "foundry_mlx": __version__,
        "git_revision": _git_revision(),
        # The engine's environment switches (FOUNDRY_PREFILL_COMPILE, FOUNDRY_QGEMM...): a result
        # file says which paths it measured.
        "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FOUNDRY_") and k != "FOUNDRY_GIT_REVISION"},
    }
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except ImportError:
        pass
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if gpu.returncode == 0:
            info["gpu"] = gpu.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def _git_revision() -> str:
    """The checkout's commit (+dirty); where there is no .git (a copied tree), $FOUNDRY_GIT_REVISION."""
    if os.environ.get("FOUNDRY_GIT_REVISION"):
        return os.environ["FOUNDRY_GIT_REVISION"]
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def table(measurements: list[Measurement]) -> str:
    """A Markdown table: one row per setting, both engines side by side, and their ratio."""
    engines = list(dict.fromkeys(m.engine for m in measurements))
    settings = list(dict.fromkeys((m.kind, m.length) for m in measurements))
    by_key = {(m.engine, m.kind, m.length): m for m in measurements}
    header = "| setting | " + " | ".join(f"{e} tok/s (median [min]) | GB/s, TFLOP/s" for e in engines)
    header += " | ratio |" if len(engines) == 2 else " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(engines) + (len(engines) == 2))]
    for kind, length in settings:
        label = f"prefill {length} tokens" if kind == "prefill" else f"decode @ depth {length}"
        cells, medians = [], []
        for engine in engines:
            m = by_key.get((engine, kind, length))
            if m is None:
                cells += ["–", "–"]
                continue
            s = m.summary()
            medians.append(s["median"])
            rate = (f"{statistics.median(m.tflops):.1f} TFLOP/s" if m.tflops
                    else f"{statistics.median(m.bandwidth_gb_s):.1f}")
            cells += [f"{s['median']:.1f} [{s['min']:.1f}]", rate]
        ratio = f" | {medians[0] / medians[1]:.2f}×" if len(medians) == 2 else ""
        lines.append(f"| {label} | " + " | ".join(cells) + ratio + " |")
    return "\n".join(lines)


def save(measurements: list[Measurement], meta: dict, path: Path) -> None:
    path.write_text(json.dumps({"meta": meta, "results": [asdict(m) | {"summary": m.summary()} for m in measurements]}, indent=1))


def plot(measurements: list[Measurement], title: str, path: Path) -> bool:
    """tok/s against prompt length (prefill) and context depth (decode), one line per engine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, kind, xlabel in ((axes[0], "prefill", "prompt length (tokens)"), (axes[1], "decode", "context depth (tokens)")):
        for engine in dict.fromkeys(m.engine for m in measurements):
            points = sorted((m.length, m.summary()["median"], m.summary()["min"], m.summary()["max"])
                            for m in measurements if m.engine == engine and m.kind == kind)
            if not points:
                continue
            x, median, low, high = zip(*points)
            axis.errorbar(x, median, yerr=[np.subtract(median, low), np.subtract(high, median)], marker="o", capsize=3, label=engine)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("tokens / s (median, min–max)")
        axis.set_title(kind)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True
