"""A multi-turn conversation: messages, the chat template, and one KV cache kept across turns."""

from __future__ import annotations

from collections.abc import Iterator

from .generate import GenerationResponse, Session, stream_generate
from .sampling import SamplingParams


class Chat:
    """Each `send` renders the whole conversation with the model's own chat template, then
    prefills only the tokens the KV cache does not hold yet (the new user turn, plus any part of
    the last reply that the template renders differently from how it was generated)."""

    def __init__(self, model, tokenizer, system: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages: list[dict[str, str]] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.session = Session(self.model)

    def send(
        self, content: str, max_tokens: int = 512, sampling: SamplingParams | None = None, stop: tuple[str, ...] = ()
    ) -> Iterator[GenerationResponse]:
        """Stream the reply to a user message; the reply joins the conversation when complete."""
        self.messages.append({"role": "user", "content": content})
        reply = []
        try:
            prompt = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            for response in stream_generate(
                self.model, self.tokenizer, ids, max_tokens=max_tokens, sampling=sampling, stop=stop,
                session=self.session,
            ):
                reply.append(response.text)
                if response.finish_reason is not None:
                    # Complete: it joins the conversation even if the caller stops iterating here.
                    self.messages.append({"role": "assistant", "content": "".join(reply)})
                yield response
        except BaseException:
            if self.messages[-1]["role"] == "user":
                self.messages.pop()  # a failed or interrupted turn leaves no half message behind
            raise
