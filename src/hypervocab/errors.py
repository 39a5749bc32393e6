"""The exceptions hypervocab raises.

Every error is a :class:`HypervocabError` and also a built-in ``ValueError`` or
``TypeError``, so code that already catches those keeps working::

    HypervocabError
    ├── ConfigError(ValueError)          a setting is out of range or inconsistent
    ├── InvalidTokenError(ValueError)    an input id cannot be encoded
    │   └── TokenTypeError(TypeError)    ...because the input is not a 1-D integer sequence
    ├── InvalidCodeError(ValueError)     a code cannot be decoded at its position
    │   └── CodeTypeError(TypeError)     ...because the input is not a 1-D integer sequence
    └── InputTypeError(TypeError)        an argument has the wrong type
"""

from __future__ import annotations

__all__ = [
    "HypervocabError",
    "ConfigError",
    "InvalidTokenError",
    "InvalidCodeError",
    "InputTypeError",
    "TokenTypeError",
    "CodeTypeError",
]


class HypervocabError(Exception):
    """Base class of every error raised by hypervocab."""


class ConfigError(HypervocabError, ValueError):
    """A setting is out of range or inconsistent with another one."""


class InputTypeError(HypervocabError, TypeError):
    """An argument has the wrong type, dtype or number of dimensions."""


class InvalidTokenError(HypervocabError, ValueError):
    """An input id cannot be encoded (outside the base vocabulary)."""


class InvalidCodeError(HypervocabError, ValueError):
    """A code cannot be decoded: it is negative, beyond the id space, or a hypertoken not defined at its position."""


class TokenTypeError(InvalidTokenError, InputTypeError):
    """Ids to encode are not a 1-D sequence of integers."""


class CodeTypeError(InvalidCodeError, InputTypeError):
    """Codes to decode are not a 1-D sequence of integers."""
