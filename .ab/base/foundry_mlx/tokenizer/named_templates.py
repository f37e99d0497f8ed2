"""Chat templates for models whose file carries none (a base model such as Gemma 3 270M).

A model's own `tokenizer.chat_template` always wins unless the user names another one. The
built-in templates are the published ones, verbatim: `gemma` is the template Google ships with
the instruction-tuned Gemma 3 models, `chatml` the `<|im_start|>role ... <|im_end|>` format.
A template can also be a path to a Jinja file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import FoundryError

NAMED_TEMPLATES = ("chatml", "gemma")

# Which built-in template suits a model without one, by the special tokens its vocabulary has.
_BY_MARKER = (("<start_of_turn>", "gemma"), ("<|im_start|>", "chatml"))


def named_template(name: str) -> str:
    """The source of a built-in template (`chatml`, `gemma`) or of a Jinja file at `name`."""
    if name in NAMED_TEMPLATES:
        return resources.files(__package__).joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FoundryError(
        f"No chat template named {name!r}: use one of {', '.join(NAMED_TEMPLATES)} or the path of a Jinja file."
    )


def suggested_template(has_token) -> str:
    """The built-in template to use for a model without one: the one whose markers the
    vocabulary has (`has_token(text) -> bool`), else chatml."""
    for marker, name in _BY_MARKER:
        if has_token(marker):
            return name
    return "chatml"
