"""Llama 2/3, Mistral, SmolLM (GGUF architecture `llama`).

In this engine's representation a Llama layer is a Qwen2 layer without Q/K/V biases: the same
RMSNorm, grouped-query attention, half-split RoPE (the loader undoes llama.cpp's Q/K row
permutation) and SwiGLU MLP. `Linear` carries a bias only where the weights have one, so the
Qwen2 classes serve unchanged; Llama 3's RoPE frequency factors arrive through `rope_scaling`.
"""

from .qwen2 import MLP, Attention, Model, TransformerBlock

__all__ = ["Attention", "MLP", "Model", "TransformerBlock"]
