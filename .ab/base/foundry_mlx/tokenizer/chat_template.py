"""Render a model's chat template the way transformers' `apply_chat_template` does, sandboxed.

A chat template is Jinja code that ships inside a downloaded model, so it is untrusted: it runs in
jinja2's `ImmutableSandboxedEnvironment`, hardened further below, and every failure (syntax
error, escape attempt, `raise_exception`, a missing file) becomes a `FoundryError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import FoundryError

# transformers marks the final message with this to cut the prompt right after its content.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _TemplateRaisedError(FoundryError):
    """The template itself called `raise_exception(message)`."""


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # jinja2 returns a silent Undefined here, so `{{ ''.__class__ }}` would render as "";
        # an attempt to reach Python internals should stop the render instead.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
        )


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as transformers' hardened version does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with '_' ({name!r})")


class _DictFactory:
    """`dict(...)` for templates, without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` and render its body as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(line)


def _raise_exception(message: str) -> None:
    raise _TemplateRaisedError(f"The model's chat template refused these messages: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own `tojson` escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON-like types, so the template sees no object's methods.

    The sandbox only knows the dangers of built-in types; a rich object in a message (an
    array, an image) could have a public method that writes files. transformers does the same.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    for plain_type in (bool, str, int, float):  # subclasses (enums, numpy floats...)
        if isinstance(value, plain_type):
            return plain_type(value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # a NumPy scalar such as np.int64(3) or np.bool_(False)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


def _environment() -> _Sandbox:
    # No loader: `{% include %}`, `{% import %}` and `{% extends %}` cannot reach any file.
    environment = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _Namespace
    environment.globals["dict"] = _DictFactory()
    return environment


class ChatTemplate:
    """A compiled chat template; `render` returns the prompt text."""

    def __init__(self, source: str) -> None:
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as error:
            raise FoundryError(
                f"The model's chat template is not valid Jinja (line {error.lineno}: "
                f"{error.message}); fix the template or use `generate` for raw completion."
            ) from None
        self.source = source

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool,
        special_tokens: Mapping[str, str],
        continue_final_message: bool | str = False,
        **variables: Any,
    ) -> str:
        """Render `messages` with transformers' conventions.

        Keys whose value is None are dropped from each message (many templates print "None"
        or crash on them but handle a missing key). `continue_final_message` cuts the prompt
        right after the last message's content, so the model continues it.
        """
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise FoundryError("Chat messages must be a list of dicts with 'role' and 'content'.")
        if not messages:
            raise FoundryError("Cannot build a chat prompt from an empty list of messages.")
        chat = [
            {key: _plain(value) for key, value in m.items() if value is not None} for m in messages
        ]

        field = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = chat[-1].get(field)
            if not isinstance(final, str):
                raise FoundryError(
                    f"continue_final_message needs the last message to have a text {field!r}."
                )
            chat[-1][field] = final + _CONTINUE_TAG
            add_generation_prompt = False

        context = {
            **special_tokens,
            "tools": None,
            "documents": None,
            **_plain(variables),
            "messages": chat,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            rendered = self._template.render(**context)
        except FoundryError:
            raise
        except SecurityError as error:
            raise FoundryError(
                f"The model's chat template tried something unsafe and was stopped ({error}); "
                "use a trusted model or `generate` for raw completion."
            ) from None
        except TypeError as error:
            if "no loader" in str(error):
                raise FoundryError(
                    "The model's chat template tries to load another template or file, which is "
                    "not allowed; use a self-contained template."
                ) from None
            raise FoundryError(f"The model's chat template failed: {error}.") from None
        except (
            TemplateError, ArithmeticError, LookupError, ValueError, AttributeError, RecursionError
        ) as error:
            raise FoundryError(
                f"The model's chat template failed ({type(error).__name__}: {error}); "
                "check the messages or use `generate` for raw completion."
            ) from None

        if field is not None:
            tag = _CONTINUE_TAG.strip()
            if tag not in rendered:
                raise FoundryError(
                    "continue_final_message is set but the template dropped the final message."
                )
            cut = rendered.rindex(tag)
            if rendered[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                rendered = rendered[:cut]
            else:  # the template trimmed the content's trailing space, so trim ours too
                rendered = rendered[:cut].rstrip()
        return rendered
