"""The engine: KV cache, sampling, and the prefill/decode loop."""
