"""The exceptions hypervocab raises.

Every error is a :class:`HypervocabError` and also a built-in ``ValueError`` or
``TypeError``, so code that already catches those keeps working::

    HypervocabError
    ├── ConfigError(ValueError)          a setting is out of range or inconsistent
    ├── InvalidTokenError(ValueError)    an input id cannot be encoded
    │   └── TokenTypeError(TypeError)    ...because the input is not a 1-D integer sequence
    ├── InvalidCodeError(ValueError)     a code cannot be decoded at its position
    │   └── CodeTypeError(TypeError)     ...because the input is not a 1-D integer sequence
    ├── StateError(ValueError)           a call the object's state does not allow now (a consumed past,
    │                                    drafts read ahead and pending, a full static cache)
    └── InputTypeError(TypeError)        an argument has the wrong type

    UntrainedEncodersWarning(UserWarning)  a model was wrapped with fresh hyper-encoders (not a checkpoint)

:func:`check_int` (and :func:`int_problem`, which returns the message instead of raising) is the one
check of an integer setting, so every such message reads the same.
"""

from __future__ import annotations

import numbers
from typing import Literal, overload

__all__ = [
    "HypervocabError",
    "ConfigError",
    "InvalidTokenError",
    "InvalidCodeError",
    "InputTypeError",
    "StateError",
    "UntrainedEncodersWarning",
    "TokenTypeError",
    "CodeTypeError",
    "check_int",
    "int_problem",
]


class HypervocabError(Exception):
    """Base class of every error raised by hypervocab."""


class ConfigError(HypervocabError, ValueError):
    """A setting is out of range or inconsistent with another one."""


class InputTypeError(HypervocabError, TypeError):
    """An argument has the wrong type, dtype or number of dimensions."""


class StateError(HypervocabError, ValueError):
    """A call that the object's state does not allow now: a ``past`` continued already, drafts read ahead and
    still pending, a static cache that is full.  (A ``ValueError``, as Python's own "I/O operation on closed
    file" is: the arguments are fine, the protocol was not followed.)"""


class UntrainedEncodersWarning(UserWarning):
    """``hypervocab.load`` wrapped a plain causal LM: its hyper-encoders are fresh, so a hypertoken means little
    more than its first token until the model is trained."""


class InvalidTokenError(HypervocabError, ValueError):
    """An input id cannot be encoded (outside the base vocabulary)."""


class InvalidCodeError(HypervocabError, ValueError):
    """A code cannot be decoded: it is negative, beyond the id space, or a hypertoken not defined at its position.

    Errors raised while decoding codes also carry ``position`` (the index of the bad code in the codes
    given) and ``reason`` (why it cannot be decoded there), for callers that renumber positions.
    """

    position: int
    reason: str


class TokenTypeError(InvalidTokenError, InputTypeError):
    """Ids to encode are not a 1-D sequence of integers."""


class CodeTypeError(InvalidCodeError, InputTypeError):
    """Codes to decode are not a 1-D sequence of integers."""


# ---------------------------------------------------------------------------------------------- checks


def int_problem(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None,
                optional: bool = False) -> str | None:
    """What is wrong with ``value`` as the integer setting ``name``, or ``None`` when nothing is.

    An int is a Python or NumPy integer, never a bool, within ``[minimum, maximum]`` (each bound only when
    given); ``None`` is allowed when ``optional``.  The message reads ``"{name} must be an int >= {minimum},
    got {value!r}"``, ``"... an int in [{minimum}, {maximum}] ..."`` or ``"... an int <= {maximum} ..."``,
    with ``" or None"`` after the range when ``optional``.
    """
    if value is None and optional:
        return None
    n = int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None
    if n is not None and (minimum is None or n >= minimum) and (maximum is None or n <= maximum):
        return None
    if minimum is not None and maximum is not None:
        what = f"an int in [{minimum}, {maximum}]"
    elif minimum is not None:
        what = f"an int >= {minimum}"
    elif maximum is not None:
        what = f"an int <= {maximum}"
    else:
        what = "an int"
    shown = value if n is None else n  # np.int64(3) reads as 3
    return f"{name} must be {what}{' or None' if optional else ''}, got {shown!r}"


@overload
def check_int(name: str, value: object, *, minimum: int | None = ..., maximum: int | None = ...,
              optional: Literal[False] = ..., error: type[Exception] = ...) -> int: ...


@overload
def check_int(name: str, value: object, *, minimum: int | None = ..., maximum: int | None = ...,
              optional: bool, error: type[Exception] = ...) -> int | None: ...


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False, error: type[Exception] = ConfigError) -> int | None:
    """``value`` as a Python int (``None`` stays ``None`` when ``optional``), or ``error`` (default
    :class:`ConfigError`) with :func:`int_problem`'s message when it is not an int within the bounds.

    >>> check_int("window", 0, minimum=1)
    Traceback (most recent call last):
    ...
    hypervocab.errors.ConfigError: window must be an int >= 1, got 0
    """
    problem = int_problem(name, value, minimum=minimum, maximum=maximum, optional=optional)
    if problem is not None:
        raise error(problem)
    return None if value is None else int(value)  # type: ignore[call-overload]  # an int by now
