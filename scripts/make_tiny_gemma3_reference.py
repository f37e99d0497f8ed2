"""Record transformers' outputs on the tiny Gemma 3 GGUF of tests/tiny_models.py (`gemma3_spec`),
for tests/test_gemma3.py: a model whose sliding window (8) is far shorter than the sequences, so
the local layers' ring-buffer caches wrap many times while the reference still runs in seconds.

transformers is told `query_pre_attn_scalar = head_dim`: a GGUF does not store the attention
scale, and llama.cpp (the format's own engine) uses 1/sqrt(head_dim) for Gemma 3 (transformers'
default 256 is the same thing for every real Gemma 3 but the 27B, and for this tiny head_dim of 32
it is not). Everything else comes from the file.

    python scripts/make_tiny_gemma3_reference.py     # writes tests/data/reference_gemma3_tiny.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import gemma3_spec, write_tiny_model  # noqa: E402

SEQUENCE = 40
PROMPT = 6
GREEDY = 30


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as scratch:
        tiny = write_tiny_model(Path(scratch) / "tiny-gemma3.gguf", gemma3_spec())
        digest = hashlib.sha256(tiny.path.read_bytes()).hexdigest()
        model = AutoModelForCausalLM.from_pretrained(
            scratch, gguf_file=tiny.path.name, dtype=torch.float32, query_pre_attn_scalar=tiny.spec.head_dim
        )
    model.eval()
    rng = np.random.default_rng(7)
    ordinary = [i for i, t in enumerate(tiny.tokens) if not t.startswith("<|")]
    sequence = [int(i) for i in rng.choice(ordinary, SEQUENCE)]
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].numpy()
        ids, greedy, margins = sequence[:PROMPT], [], []
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(GREEDY):
            step = out.logits[0, -1]
            top2 = torch.topk(step, 2).values
            greedy.append(int(torch.argmax(step)))
            margins.append(float(top2[0] - top2[1]))
            out = model(torch.tensor([[greedy[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    data = {
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32, CPU",
        "config": {k: getattr(model.config, k, None) for k in ("sliding_window", "layer_types", "query_pre_attn_scalar")},
        "gguf_sha256": digest,
        "sequence": sequence,
        "logits": np.round(logits.astype(np.float64), 6).tolist(),
        "prompt": sequence[:PROMPT],
        "greedy_ids": greedy,
        "margins": margins,
    }
    (ROOT / "tests/data/reference_gemma3_tiny.json").write_text(json.dumps(data))
    print(digest, data["config"], greedy)


if __name__ == "__main__":
    main()
