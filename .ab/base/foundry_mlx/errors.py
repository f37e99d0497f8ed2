"""User-facing errors.

A `FoundryError` is a problem with the user's input or environment (a missing model, a corrupt
file, a prompt too long for the context). Its message is one sentence that names the thing and
the fix; the CLI prints it without a traceback. Anything else that escapes is a bug.
"""


class FoundryError(Exception):
    """A problem the user can fix; the message says how."""


class ModelNotFoundError(FoundryError):
    """The model name or path cannot be turned into local files."""


class ModelFormatError(FoundryError):
    """A model file is corrupt, truncated, or uses something this engine does not support."""


class ContextLengthError(FoundryError):
    """The prompt plus the requested new tokens do not fit the model's context."""
