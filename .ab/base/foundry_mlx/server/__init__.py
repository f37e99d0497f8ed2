"""The OpenAI-compatible server (`foundry-mlx serve`): HTTP routes (`app`), continuous batching
(`scheduler`), the prompt cache (`prompt_cache`), limited chat-template rendering (`templates`)
and the chat page (`static/`). Needs the `server` extra: `pip install "foundry-mlx[server]"`."""
