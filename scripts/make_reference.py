"""Record what an independent implementation computes on the real model, for tests/test_reference.py.

The reference is Hugging Face `transformers` loading the same GGUF on PyTorch CPU in float32
(it dequantizes every tensor with the `gguf` package; none of our loading code is involved).
For each case it records: the prompt ids (from transformers' own tokenizer), the greedy
continuation with the top-1/top-2 logit margin at every step (so a test can tell a real
disagreement from a near-tie), and the full logits at the last prompt position.

    pip install torch==2.13.0 transformers accelerate
    python scripts/make_reference.py            # writes tests/data/reference_qwen.{json,npz}
    python scripts/make_reference.py smollm2    # reference_smollm2.{json,npz}
    python scripts/make_reference.py gemma3     # reference_gemma3.{json,npz} (built-in gemma template)

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
QWEN_CASES = [
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
# Short prompts and few tokens: the tests run these on the CPU in CI.
SMOLLM2_CASES = [
    {"name": "chat_capital", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"name": "raw_code", "text": "def fibonacci(n):\n   "},
    {
        "name": "chat_two_turns",
        "messages": [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "And the next one?"},
        ],
    },
]
GEMMA3_CASES = [
    {"name": "raw_capital", "text": "The capital of France is"},
    {"name": "raw_code", "text": "def fibonacci(n):\n   "},
    {"name": "chat_gemma_template", "messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
]
# family → (alias, cases, chat template for a file without one, greedy tokens)
FAMILIES = {
    "qwen": (sources.DEFAULT_MODEL, QWEN_CASES, None, GREEDY_TOKENS),
    "smollm2": ("smollm2-135m", SMOLLM2_CASES, None, 10),
    "gemma3": ("gemma3-270m", GEMMA3_CASES, "gemma", 10),
}


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = sys.argv[1] if len(sys.argv) > 1 else "qwen"
    alias, cases, template, greedy_tokens = FAMILIES[family]
    path = sources.resolve(alias)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if template is not None:
        from foundry_mlx.tokenizer.named_templates import named_template

        tokenizer.chat_template = named_template(template)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    model.eval()
    records, logits_out = [], {}
    for case in cases:
        if "messages" in case:
            text = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
        else:
            text = case["text"]
        # Raw text gets BOS where the model asks for it (Gemma); a rendered template writes its own.
        prompt_ids = tokenizer.encode(text, add_special_tokens="messages" not in case)
        ids = list(prompt_ids)
        greedy, margins = [], []
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
            logits_out[case["name"]] = out.logits[0, -1].numpy().astype(np.float32)
            past, step_logits = out.past_key_values, out.logits[0, -1]
            for _ in range(greedy_tokens):
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
        "model_sha256": sources.ALIASES[alias].sha256,
        "cases": records,
    }
    (ROOT / f"tests/data/reference_{family}.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    np.savez_compressed(ROOT / f"tests/data/reference_{family}_logits.npz", **logits_out)


if __name__ == "__main__":
    main()
