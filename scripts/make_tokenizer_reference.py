"""Record an independent reference for tests/test_tokenizer.py: transformers reading the same GGUF.

transformers builds its own tokenizer from the GGUF (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`, which needs torch, so this runs here and not in CI). For every entry of
tests/data/tokenizer_corpus.json it records the token ids and the decoded text, and for a few
conversations the rendered chat prompt and its ids. Never edit the output by hand: re-run this.

    python scripts/make_tokenizer_reference.py /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
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
    arguments = parser.parse_args()

    import jinja2
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    gguf = arguments.gguf.resolve()
    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    corpus = json.loads(CORPUS.read_text(encoding="utf-8"))
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
        prompt = reference.apply_chat_template(messages, tokenize=False, **options)
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
    OUTPUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(entries)} corpus entries and {len(chats)} chats to {OUTPUT}")


if __name__ == "__main__":
    main()
