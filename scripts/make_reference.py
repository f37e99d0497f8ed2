"""Record what an independent implementation computes on the real model, for tests/test_reference.py.

The reference is Hugging Face `transformers` loading the same GGUF on PyTorch CPU in float32
(it dequantizes every tensor with the `gguf` package; none of our loading code is involved).
For each case it records: the prompt ids (from transformers' own tokenizer), the greedy
continuation with the top-1/top-2 logit margin at every step (so a test can tell a real
disagreement from a near-tie), and the full logits at the last prompt position.

    pip install torch==2.13.0 transformers accelerate
    python scripts/make_reference.py            # writes tests/data/reference_qwen.{json,npz}

CI does not have torch, so the tests read these files instead of running transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from foundry_mlx import sources  # noqa: E402

GREEDY_TOKENS = 16
CASES = [
    {"name": "chat_code", "messages": [{"role": "user", "content": "Write a Python function that reverses a string."}]},
    {"name": "raw_code", "text": 'def fibonacci(n):\n    """'},
    {"name": "chat_chinese", "messages": [{"role": "user", "content": "用一句话介绍一下你自己。"}]},
    {
        "name": "chat_two_turns",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "And the next one after it?"},
        ],
    },
]


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sources.resolve(sources.DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    records, logits_out = [], {}
    for case in CASES:
        if "messages" in case:
            text = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
        else:
            text = case["text"]
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        ids = list(prompt_ids)
        greedy, margins = [], []
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
            logits_out[case["name"]] = out.logits[0, -1].numpy().astype(np.float32)
            past, step_logits = out.past_key_values, out.logits[0, -1]
            for _ in range(GREEDY_TOKENS):
                top2 = torch.topk(step_logits, 2).values
                token = int(torch.argmax(step_logits))
                greedy.append(token)
                margins.append(float(top2[0] - top2[1]))
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, step_logits = out.past_key_values, out.logits[0, -1]
        records.append({**case, "prompt": text, "prompt_ids": prompt_ids, "greedy_ids": greedy, "margins": margins})
        print(case["name"], len(prompt_ids), "prompt tokens →", repr(tokenizer.decode(greedy)))
    data = {
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32, CPU",
        "model_sha256": sources.ALIASES[sources.DEFAULT_MODEL].sha256,
        "cases": records,
    }
    (ROOT / "tests/data/reference_qwen.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    np.savez_compressed(ROOT / "tests/data/reference_qwen_logits.npz", **logits_out)


if __name__ == "__main__":
    main()
