"""A Gemma 3 270M chat longer than its 512-position sliding window, on the real file: the KV cache
bytes of every layer after each turn, then the logits of one more turn (prefilled at an offset,
over wrapped ring buffers) against transformers on the same token ids.

    python scripts/measure_gemma_long_chat.py run OUT.npz        # foundry-mlx (this venv)
    python scripts/measure_gemma_long_chat.py reference OUT.npz  # transformers (a torch venv)

The first prints one line per turn; the second the max |Δlogit| against transformers. The
results in benchmarks/results/cpu-gemma3-270m-long-chat.md were printed by these two commands.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps, "
    "checking the lamp, and writing the weather in a small blue notebook. "
) * 14
TURNS = [
    STORY + "\nSummarize this story in one sentence.",
    "What colour is the notebook?",
    STORY.replace("evening", "morning") + "\nWhat changed in this version?",
    "Thank you. Goodbye.",
]
LAST = "One more question: how many steps?"


def run(out: Path) -> None:
    import mlx.core as mx

    from foundry_mlx import load
    from foundry_mlx.engine.chat import Chat
    from foundry_mlx.engine.generate import _prefill
    from foundry_mlx.engine.rotating_cache import RotatingKVCache

    model, tokenizer = load("gemma3-270m", progress=False, chat_template="gemma")
    chat = Chat(model, tokenizer)
    for text in TURNS:
        start = time.time()
        reply = "".join(r.text for r in chat.send(text, max_tokens=32))
        caches = chat.session.cache
        local = sorted({c.nbytes for c in caches if isinstance(c, RotatingKVCache)})
        global_ = sorted({c.nbytes for c in caches if not isinstance(c, RotatingKVCache)})
        positions = caches[0].offset
        unbounded = len(caches) * -(-positions // 256) * 256 * 2 * model.config.head_dim * 4  # 1 KV head, float32
        print(f"positions {positions:4d} | local layers (15): {local} bytes each | global layers (3): "
              f"{global_} bytes each | all KV {sum(c.nbytes for c in caches) / 1e6:.2f} MB "
              f"(without windows: {unbounded / 1e6:.2f} MB) | {time.time() - start:.0f} s | reply {reply[:50]!r}")
    messages = [*chat.messages, {"role": "user", "content": LAST}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    reused = chat.session.reuse(ids)
    logits = np.array(_prefill(model, chat.session, ids[reused:]).astype(mx.float32))[0]
    print(f"last turn: {len(ids)} positions, {reused} reused from the cache, {len(ids) - reused} prefilled")
    np.savez(out, ids=np.array(ids), logits=logits)


def reference(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from foundry_mlx import sources

    path = sources.resolve("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    saved = np.load(out)
    with torch.no_grad():
        expected = model(torch.tensor([saved["ids"].tolist()])).logits[0, -1].numpy()
    difference = np.abs(expected - saved["logits"]).max()
    print(f"transformers, {len(saved['ids'])} positions: max |Δlogit| {difference:.4f}, "
          f"argmax {expected.argmax()} vs ours {saved['logits'].argmax()}")


if __name__ == "__main__":
    {"run": run, "reference": reference}[sys.argv[1]](Path(sys.argv[2]))
