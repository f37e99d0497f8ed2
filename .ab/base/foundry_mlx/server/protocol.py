"""The OpenAI request and response shapes the server speaks, and their validation.

Requests are checked strictly (wrong types are errors, not coerced). Fields that would change
the meaning of an answer and that this server does not implement (`tools`, `response_format`
other than text, `logprobs`, `n` > 1, ...) are refused with a 400 naming the field, never silently
ignored. Harmless fields OpenAI clients send (`user`, `store`, `metadata`) are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.sampling import SamplingParams


class APIError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)  # what mx.random.key takes
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate through end-of-turn tokens

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed,
        )

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16 or any(len(s) > 256 for s in stops):
            raise APIError(400, "'stop' takes at most 16 strings of at most 256 characters; send fewer or shorter ones.", "stop")
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        """Fields that would change the answer's meaning, which this server does not implement."""
        refused = {
            "n": self.n != 1,
            "logprobs": bool(self.logprobs),
            "top_logprobs": bool(self.top_logprobs),
            "logit_bias": bool(self.logit_bias),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
        }
        extra = self.model_extra or {}
        for name in ("tools", "functions", "tool_choice", "function_call", "audio", "prediction", "suffix", "echo", "best_of"):
            value = extra.get(name)
            refused[name] = value not in (None, [], "", False, "none", "auto", 1) or (name == "echo" and value is True)
        response_format = extra.get("response_format")
        refused["response_format"] = response_format is not None and response_format != {"type": "text"}
        modalities = extra.get("modalities")
        refused["modalities"] = modalities is not None and modalities != ["text"]
        for name, is_refused in refused.items():
            if is_refused:
                raise APIError(
                    400, f"'{name}' is not supported by this server; remove it from the request.", name, "unsupported_parameter"
                )
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true; remove it or set stream.", "stream_options")


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompt_value(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported; send the prompts as separate requests.", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "'prompt' is empty; give at least one character or token.", "prompt")
        return prompt


def parse(model: type[_Strict], payload: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object; send an object with 'model' and the other fields.")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        field = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, f"Invalid '{where}': {first['msg'].rstrip('.')}; fix this field and resend.", field) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_response(request_id: str, model: str, text: str, finish: str, usage_: dict) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage_,
    }


def chat_chunk(request_id: str, model: str, delta: dict, finish: str | None, usage_: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def completion_response(request_id: str, model: str, text: str, finish: str | None, usage_: dict | None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }
