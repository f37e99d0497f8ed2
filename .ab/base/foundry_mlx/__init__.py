"""foundry-mlx: a fast LLM inference engine on MLX, with custom Metal and CUDA kernels.

    import foundry_mlx as fm
    model, tokenizer = fm.load("qwen2.5-coder-0.5b")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    print(fm.generate(model, tokenizer, prompt, max_tokens=48))
"""

from .engine.generate import GenerationResponse, Session, generate, stream_generate
from .engine.sampling import SamplingParams
from .errors import ContextLengthError, FoundryError, ModelFormatError, ModelNotFoundError
from .loader import load

__version__ = "0.1.0"

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "GenerationResponse",
    "Session",
    "SamplingParams",
    "FoundryError",
    "ModelFormatError",
    "ModelNotFoundError",
    "ContextLengthError",
    "__version__",
]
