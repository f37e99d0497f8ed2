"""Tokenization: `Tokenizer` (encode, decode, chat templates) and `StreamingDetokenizer`.

    from foundry_mlx.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
"""

from .core import Tokenizer
from .streaming import StreamingDetokenizer

__all__ = ["StreamingDetokenizer", "Tokenizer"]
