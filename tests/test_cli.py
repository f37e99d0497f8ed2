"""The command line (`foundry_mlx/cli.py`) on tiny model files, through click's CliRunner."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from tiny_models import TinySpec, qwen2_quantized_spec, write_tiny_model

from foundry_mlx import generate, kernels, load, sources
from foundry_mlx.cli import main
from foundry_mlx.engine.chat import Chat

STATS = re.compile(r"^\[prompt: \d+ tokens, [\d.]+ tok/s \| generated: \d+ tokens, [\d.]+ tok/s \| first token: [\d.]+ s \| peak memory: [\d.]+ GB\]$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.gguf", TinySpec(seed=10))


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "quantized.gguf", qwen2_quantized_spec())


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No network, no real cache, and the kernel choice (`--kernels` sets it process-wide) restored."""
    monkeypatch.setenv("FOUNDRY_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(kernels, "_mode", "auto")
    monkeypatch.setattr(kernels, "_resolved", False)
    monkeypatch.setattr(kernels, "_active", None)


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def assert_user_error(result, pattern: str) -> str:
    """Exit status non-zero, no traceback, and exactly one `error:` line that matches."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, result.output
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


# --- commands that work ------------------------------------------------------------------------------


def test_chat_two_turns(tiny):
    result = invoke("chat", "-m", str(tiny.path), "-p", "hello", "-p", "and then?", "-n", "4")
    assert result.exit_code == 0, result.output
    stdout = result.stdout
    assert ">>> hello" in stdout and ">>> and then?" in stdout
    assert stdout.index(">>> hello") < stdout.index(">>> and then?")
    stats = [line for line in result.stderr.splitlines() if line.startswith("[prompt:")]
    assert len(stats) == 2 and all(STATS.match(line) for line in stats)
    # The replies are those of the library's Chat with the same turns.
    model, tokenizer = load(str(tiny.path), progress=False)
    chat = Chat(model, tokenizer)
    turns = [list(chat.send(turn, max_tokens=4)) for turn in ("hello", "and then?")]
    replies = ["".join(r.text for r in responses) for responses in turns]
    assert stdout == f">>> hello\n{replies[0]}\n>>> and then?\n{replies[1]}\n"
    for line, responses in zip(stats, turns, strict=True):
        assert f"[prompt: {responses[-1].prompt_tokens} tokens," in line
        assert f"generated: {len(responses)} tokens," in line


def test_chat_one_turn_without_stats(tiny):
    result = invoke("chat", "-m", str(tiny.path), "-p", "hello", "-n", "3", "--no-stats")
    assert result.exit_code == 0, result.output
    assert ">>>" not in result.stdout and "[prompt:" not in result.stderr


def test_chat_interactive_with_reset(tiny):
    result = invoke("chat", "-m", str(tiny.path), "-n", "2", input="hello\n/reset\nagain\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "(conversation cleared)" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("[prompt:")]) == 2


def test_generate_json(tiny):
    result = invoke("generate", "-m", str(tiny.path), "-p", "x", "--json", "-n", "5")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    model, tokenizer = load(str(tiny.path), progress=False)
    assert payload["text"] == generate(model, tokenizer, "x", max_tokens=5)
    assert payload["generation_tokens"] == 5 and payload["finish_reason"] == "length"
    assert payload["prompt_tokens"] == len(tokenizer.encode("x"))
    assert payload["kernels"] == "reference"
    for key in ("prompt_tps", "generation_tps", "time_to_first_token", "peak_memory_gb"):
        assert isinstance(payload[key], float)


def test_generate_plain_and_from_stdin(tiny):
    model, tokenizer = load(str(tiny.path), progress=False)
    expected = generate(model, tokenizer, "hello there", max_tokens=4)
    result = invoke("generate", "-m", str(tiny.path), "-p", "-", "-n", "4", input="hello there")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    assert any(STATS.match(line) for line in result.stderr.splitlines())


def test_generate_with_sampling_options_is_reproducible(tiny):
    args = ("generate", "-m", str(tiny.path), "-p", "hi", "-n", "6", "--json", "-t", "0.8", "--top-k", "20",
            "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "5")
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == second.exit_code == 0
    assert json.loads(first.stdout)["text"] == json.loads(second.stdout)["text"]


def test_info(tiny_quantized):
    result = invoke("info", str(tiny_quantized.path))
    assert result.exit_code == 0, result.output
    spec = tiny_quantized.spec
    lines = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.splitlines()
                 if re.match(r"^[a-z]", line) and re.search(r"\s{2,}", line))
    assert lines["architecture"] == "qwen2"
    assert lines["layers"] == str(spec.layers)
    assert lines["hidden size"] == str(spec.hidden)
    assert lines["heads"] == f"{spec.heads} query, {spec.kv_heads} key/value, head dim {spec.head_dim}"
    assert lines["feed-forward"] == str(spec.ffn)
    assert lines["vocabulary"] == str(tiny_quantized.vocab_size)
    assert lines["context length"] == str(spec.context)
    assert lines["output head"] == "tied to the embedding"
    assert lines["chat template"] == "present"
    for type_name in {t.name for t in tiny_quantized.tensor_types.values()}:
        assert re.search(rf"^\s+{type_name}\s+→", result.stdout, re.MULTILINE), type_name
    assert re.search(r"Q6_K\s+→ .*\(near\)", result.stdout)
    assert re.search(r"Q4_K\s+→ .*\(exact\)", result.stdout)


def test_models_lists_every_alias():
    result = invoke("models")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == len(sources.ALIASES)
    for alias in sources.ALIASES.values():
        assert any(line.startswith(alias.name + " ") for line in lines)
    assert [line for line in lines if line.endswith("(default)")][0].startswith(sources.DEFAULT_MODEL)


@pytest.mark.parametrize("command", [[], ["chat"], ["generate"], ["info"], ["models"]])
def test_help(command):
    for flag in ("--help", "-h"):
        result = invoke(*command, flag)
        assert result.exit_code == 0
        assert result.output.startswith("Usage:")
        assert "Traceback" not in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "0.1.0" in result.output


# --- bad inputs: one line, no traceback --------------------------------------------------------------


def test_missing_path(tmp_path):
    result = invoke("generate", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert_user_error(result, r"nope\.gguf does not exist")


def test_unknown_model_name():
    result = invoke("chat", "-m", "no-such-model", "-p", "hi")
    line = assert_user_error(result, r"No model named 'no-such-model'")
    assert all(alias in line for alias in sources.ALIASES)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"this is not a model at all" * 10)
    assert_user_error(invoke("generate", "-m", str(path), "-p", "hi"), r"not a GGUF file")
    assert_user_error(invoke("info", str(path)), r"not a GGUF file")


def test_truncated_file(tmp_path, tiny):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny.path.read_bytes()[:-1000])
    assert_user_error(invoke("chat", "-m", str(path), "-p", "hi"), r"truncated")


def test_info_of_a_directory(tmp_path):
    assert_user_error(invoke("info", str(tmp_path)), r"is a directory")


@pytest.mark.parametrize(
    "option, pattern",
    [
        (["--temperature", "-1"], r"temperature must be >= 0"),
        (["--top-p", "0"], r"top-p must be in"),
        (["--top-k", "-3"], r"top-k must be >= 0"),
        (["--min-p", "1"], r"min-p must be in"),
        (["--repetition-penalty", "0"], r"repetition penalty must be > 0"),
    ],
)
def test_invalid_sampling_options_fail_before_loading(tmp_path, option, pattern):
    # The model path does not exist: the sampling error must come first (no load for nothing).
    result = invoke("generate", "-m", str(tmp_path / "nope.gguf"), "-p", "hi", *option)
    assert_user_error(result, pattern)


def test_unknown_kernels_value(tiny):
    result = CliRunner().invoke(main, ["generate", "-m", str(tiny.path), "-p", "hi", "--kernels", "bogus"])
    # A usage error from click: exit 2, its own "Error:" line naming the option and the choices.
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert_user_error(result, r"--kernels.*bogus.*auto.*custom.*reference")


def test_custom_kernels_without_a_gpu(tiny):
    if kernels.gpu_backend() is not None:
        pytest.skip("this MLX has a GPU backend: custom kernels are available")
    result = invoke("generate", "-m", str(tiny.path), "-p", "hi", "--kernels", "custom", "-n", "2")
    assert_user_error(result, r"Custom kernels need MLX's Metal or CUDA backend")


def test_unknown_dtype(tiny):
    result = CliRunner().invoke(main, ["generate", "-m", str(tiny.path), "-p", "hi", "--dtype", "float64"])
    assert result.exit_code == 2
    assert_user_error(result, r"--dtype")


def test_prompt_beyond_context(tiny):
    result = invoke("generate", "-m", str(tiny.path), "-p", "hi", "-n", "100000")
    assert_user_error(result, r"more than the model's context of 512")


def test_empty_prompt(tiny):
    assert_user_error(invoke("generate", "-m", str(tiny.path), "-p", ""), r"prompt is empty")


def test_chat_with_a_model_without_template(tmp_path):
    tiny = write_tiny_model(tmp_path / "plain.gguf", TinySpec(omit_metadata=("tokenizer.chat_template",)))
    result = invoke("chat", "-m", str(tiny.path), "-p", "hi", "-n", "2")
    assert result.exit_code == 0, result.output
    notices = [line for line in result.stderr.splitlines() if "no chat template" in line]
    assert len(notices) == 1 and "built-in 'chatml' template" in notices[0] and "--chat-template" in notices[0]


def test_chat_with_a_named_or_file_template(tmp_path):
    tiny = write_tiny_model(tmp_path / "plain.gguf", TinySpec(omit_metadata=("tokenizer.chat_template",)))
    result = invoke("chat", "-m", str(tiny.path), "-p", "hi", "-n", "2", "--chat-template", "gemma")
    assert result.exit_code == 0 and "no chat template" not in result.stderr
    template = tmp_path / "mine.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert invoke("chat", "-m", str(tiny.path), "-p", "hi", "-n", "2", "--chat-template", str(template)).exit_code == 0
    assert_user_error(
        invoke("chat", "-m", str(tiny.path), "-p", "hi", "--chat-template", "nonesuch"), r"No chat template named"
    )


def test_missing_required_prompt(tiny):
    result = CliRunner().invoke(main, ["generate", "-m", str(tiny.path)])
    assert result.exit_code == 2
    assert_user_error(result, r"--prompt")


# --- bench --decode-step -------------------------------------------------------------------------------


def _forget_decode_switches(monkeypatch):
    """Unset the decode-step switches for this test and restore them after it: `--decode-step` sets
    them process-wide (setenv first, so monkeypatch also undoes a value the command sets)."""
    for name in ("FOUNDRY_FUSED", "FOUNDRY_LAYER_KERNEL"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.parametrize("step", ["fused", "layer"])
def test_bench_decode_step_needing_a_gpu_says_so(tiny_quantized, step, monkeypatch):
    _forget_decode_switches(monkeypatch)
    result = invoke("bench", "-m", str(tiny_quantized.path), "--decode-step", step, "--engines", "foundry",
                    "--prompt-lengths", "4", "--depths", "0", "--decode-tokens", "2", "--trials", "1")
    assert_user_error(result, rf"--decode-step {step} needs MLX's Metal or CUDA backend")


def test_bench_decode_step_per_op_runs_and_says_which(tiny_quantized, monkeypatch):
    _forget_decode_switches(monkeypatch)
    result = invoke("bench", "-m", str(tiny_quantized.path), "--decode-step", "per-op", "--engines", "foundry",
                    "--prompt-lengths", "4", "--depths", "0", "--decode-tokens", "2", "--trials", "1")
    assert result.exit_code == 0, result.output
    assert "decode step: per-op" in result.output
    import os

    assert os.environ["FOUNDRY_FUSED"] == "0"


@pytest.mark.parametrize("keep", [False, True])
def test_bench_keep_buffers_skips_freeing_mlx_buffers_between_runs(tiny_quantized, monkeypatch, keep, tmp_path):
    import mlx.core as mx

    _forget_decode_switches(monkeypatch)
    freed = []
    monkeypatch.setattr(mx, "clear_cache", lambda: freed.append(1))
    args = ["--keep-buffers"] if keep else []
    result = invoke("bench", "-m", str(tiny_quantized.path), "--engines", "foundry", "--prompt-lengths", "4",
                    "--depths", "0", "--decode-tokens", "2", "--trials", "1", "--out", str(tmp_path / "b"), *args)
    assert result.exit_code == 0, result.output
    assert (len(freed) == 0) == keep  # one free before every warm-up and timed run otherwise
    assert json.loads((tmp_path / "b.json").read_text())["meta"]["config"]["clear_cache"] is (not keep)


@pytest.mark.parametrize("step, fused, layer", [("per-op", "0", None), ("fused", "1", "0"), ("layer", "1", "1"),
                                                ("auto", None, None)])
def test_select_decode_step_sets_the_switches(step, fused, layer, monkeypatch):
    import os

    from foundry_mlx.decode_paths import select_decode_step

    _forget_decode_switches(monkeypatch)
    select_decode_step(step)
    assert os.environ.get("FOUNDRY_FUSED") == fused
    assert os.environ.get("FOUNDRY_LAYER_KERNEL") == layer


def test_check_decode_step_names_what_stands_in_the_way(monkeypatch):
    from foundry_mlx.decode_paths import check_decode_step
    from foundry_mlx.errors import FoundryError
    from foundry_mlx.kernels import fused_step

    model = object()
    monkeypatch.setattr(fused_step, "unsupported_reason", lambda m: None)  # a model the fused plan fits
    check_decode_step("fused", model, "metal")
    check_decode_step("layer", model, "cuda")
    check_decode_step("per-op", model, "reference")
    check_decode_step("layer", model, "metal")  # the Metal rendition: an experiment a Mac user runs
    with pytest.raises(FoundryError, match="needs MLX's Metal or CUDA backend"):
        check_decode_step("layer", model, "reference")
    with pytest.raises(FoundryError, match="needs MLX's Metal or CUDA backend"):
        check_decode_step("fused", model, "reference")
    monkeypatch.setattr(fused_step, "unsupported_reason", lambda m: "the fused step is planned for qwen2, llama")
    with pytest.raises(FoundryError, match="cannot run this model: the fused step is planned for qwen2, llama"):
        check_decode_step("fused", model, "cuda")
