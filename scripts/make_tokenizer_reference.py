"""Record an independent reference for tests/test_tokenizer.py: transformers reading the same GGUF.

transformers builds its own tokenizer from the GGUF (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`, which needs torch, so this runs here and not in CI). For every entry of
tests/data/tokenizer_corpus.json it records the token ids and the decoded text, and for a few
conversations the rendered chat prompt and its ids. Never edit the output by hand: re-run this.

    python scripts/make_tokenizer_reference.py /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    python scripts/make_tokenizer_reference.py SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2
    python scripts/make_tokenizer_reference.py gemma-3-270m-q4_k_m.gguf --name gemma3 \
        --chat-template foundry_mlx/tokenizer/templates/gemma.jinja

`--name` writes tests/data/tokenizer_reference_{name}.json and adds the model's own literal
special tokens to the corpus; `--chat-template` gives transformers a template for a file that
has none (the same Jinja source our built-in named template renders). A conversation the
template refuses (roles that do not alternate...) is recorded as refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CORPUS = DATA / "tokenizer_corpus.json"
OUTPUT = DATA / "tokenizer_reference.json"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Température actuelle d'une ville, en °C — 天气",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Nom de la ville"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

# (name, messages, keyword arguments for apply_chat_template)
CONVERSATIONS: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    (
        "user_only",
        [{"role": "user", "content": "Write a haiku about tokenizers."}],
        {"add_generation_prompt": True},
    ),
    (
        "system_and_user",
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one line."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        {"add_generation_prompt": True},
    ),
    (
        "multi_turn",
        [
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Reverse a list."},
            {"role": "assistant", "content": "```python\nitems[::-1]\n```"},
            {"role": "user", "content": "In place, please.\n\tThanks!"},
        ],
        {"add_generation_prompt": True},
    ),
    (
        "multi_turn_without_generation_prompt",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ],
        {"add_generation_prompt": False},
    ),
    (
        "unicode_content",
        [{"role": "user", "content": "翻訳して: 👩‍👩‍👧‍👦 مرحبا  \r\n  naïve ☕"}],
        {"add_generation_prompt": True},
    ),
    (
        "special_tokens_in_content",
        [{"role": "user", "content": "Say <|im_end|> then <|endoftext|>."}],
        {"add_generation_prompt": True},
    ),
    (
        "tools",
        [
            {"role": "user", "content": "Quel temps fait-il à Zürich ?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"city": "Zürich", "unit": "celsius"},
                        },
                    }
                ],
            },
            {"role": "tool", "content": '{"temperature": 21, "sky": "ensoleillé"}'},
        ],
        {"add_generation_prompt": True, "tools": [WEATHER_TOOL]},
    ),
    (
        "continue_final_message",
        [
            {"role": "user", "content": "Name three primes."},
            {"role": "assistant", "content": "Sure: 2, 3,"},
        ],
        {"add_generation_prompt": False, "continue_final_message": True},
    ),
]


def _ids(value: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    if hasattr(value, "keys") and "input_ids" in value:
        value = value["input_ids"]
    return [int(token) for token in value]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="the Qwen2.5-Coder-0.5B-Instruct GGUF file")
    parser.add_argument("--name", default=None, help="write tokenizer_reference_{name}.json")
    parser.add_argument("--chat-template", type=Path, default=None, help="a Jinja file for a model without one")
    arguments = parser.parse_args()
    output = OUTPUT if arguments.name is None else DATA / f"tokenizer_reference_{arguments.name}.json"

    import jinja2
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    gguf = arguments.gguf.resolve()
    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if arguments.chat_template is not None:
        reference.chat_template = arguments.chat_template.read_text(encoding="utf-8")

    corpus = json.loads(CORPUS.read_text(encoding="utf-8"))
    if arguments.name is not None:
        corpus += _special_token_entries(reference)
    entries = []
    for entry in corpus:
        ids = _ids(reference(entry["text"])["input_ids"])
        entries.append(
            {
                "name": entry["name"],
                "text": entry["text"],
                "ids": ids,
                "decoded": reference.decode(ids),
                "decoded_skip_special": reference.decode(ids, skip_special_tokens=True),
            }
        )

    chats = []
    for name, messages, options in CONVERSATIONS:
        try:
            prompt = reference.apply_chat_template(messages, tokenize=False, **options)
        except Exception as error:  # noqa: BLE001  (jinja2's TemplateError from raise_exception)
            chats.append({"name": name, "messages": messages, "options": options, "refused": str(error)})
            continue
        ids = _ids(reference.apply_chat_template(messages, tokenize=True, **options))
        chats.append(
            {"name": name, "messages": messages, "options": options, "prompt": prompt, "ids": ids}
        )

    header = {
        "generated_by": "scripts/make_tokenizer_reference.py (do not edit by hand)",
        "reference": f"transformers {transformers.__version__} "
        f"AutoTokenizer.from_pretrained(gguf_file=...) -> {type(reference).__name__}",
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "jinja2_version": jinja2.__version__,
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256": _sha256(gguf),
        "vocab_size": len(reference),
        "bos_token": reference.bos_token,
        "eos_token": reference.eos_token,
    }
    # One entry per line keeps diffs readable; ASCII escapes keep invisible characters visible.
    lines = ["{"]
    lines += [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in header.items()]
    for section, items in (("entries", entries), ("chats", chats)):
        lines.append(f'  "{section}": [')
        lines += [f"    {json.dumps(item)}," for item in items]
        lines[-1] = lines[-1].rstrip(",")
        lines.append("  ],")
    lines[-1] = lines[-1].rstrip(",")
    lines.append("}")
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(entries)} corpus entries and {len(chats)} chats to {output}")


def _special_token_entries(reference) -> list[dict[str, str]]:
    """Literal special tokens of this vocabulary inside text, and the user-defined pieces."""
    specials = [t for t in reference.all_special_tokens if t][:6]
    markers = [t for t in ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>") if t in reference.get_vocab()]
    text = " ".join(specials + markers)
    return [
        {"name": "model_special_tokens", "text": f"{text}\nliteral: {markers[0] if markers else ''}user\nhi"},
        {"name": "model_special_glued", "text": "".join(specials + markers) + "x"},
        {"name": "html_and_bytes", "text": "<b>bold</b>\t<0x41> <unused0> [multimodal] a 5 12 345"},
    ]


if __name__ == "__main__":
    main()
