"""``check_int`` / ``int_problem``: the one check of an integer setting, and its one message format."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import hypervocab.errors
from hypervocab.errors import ConfigError, HypervocabError, InputTypeError, check_int, int_problem


@pytest.mark.parametrize("value", [0, 1, 7, 2**40, np.int64(3), np.int32(0), np.uint8(5)])
def test_ints_pass_and_come_back_as_python_ints(value):
    got = check_int("n", value, minimum=0)
    assert got == int(value) and type(got) is int
    assert int_problem("n", value, minimum=0) is None


@pytest.mark.parametrize("value, shown", [
    (True, "True"), (False, "False"), (np.bool_(True), "np.True_"), (1.0, "1.0"), ("3", "'3'"), (None, "None"),
    ([1], "[1]"),
])
def test_bools_and_non_ints_are_refused(value, shown):
    with pytest.raises(ConfigError) as e:
        check_int("n", value, minimum=0)
    assert str(e.value) == f"n must be an int >= 0, got {shown}"


@pytest.mark.parametrize("kwargs, value, message", [
    ({"minimum": 1}, 0, "window must be an int >= 1, got 0"),
    ({"minimum": 1, "maximum": 64}, 65, "window must be an int in [1, 64], got 65"),
    ({"minimum": 1, "maximum": 64}, 0, "window must be an int in [1, 64], got 0"),
    ({"maximum": 8}, 9, "window must be an int <= 8, got 9"),
    ({}, 2.5, "window must be an int, got 2.5"),
    ({"minimum": 1, "optional": True}, 0, "window must be an int >= 1 or None, got 0"),
    ({"minimum": 0, "maximum": 3, "optional": True}, "x", "window must be an int in [0, 3] or None, got 'x'"),
    ({"minimum": 1}, np.int64(-2), "window must be an int >= 1, got -2"),  # NumPy integers read as ints
])
def test_exact_messages(kwargs, value, message):
    assert int_problem("window", value, **kwargs) == message
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        check_int("window", value, **kwargs)


def test_range_bounds_are_inclusive():
    assert check_int("n", 1, minimum=1, maximum=3) == 1
    assert check_int("n", 3, minimum=1, maximum=3) == 3
    assert check_int("n", -(2**70)) == -(2**70)  # no bound: any int


def test_optional_lets_none_through_and_only_then():
    assert check_int("top_k", None, minimum=0, optional=True) is None
    assert int_problem("top_k", None, minimum=0, optional=True) is None
    assert int_problem("top_k", None, minimum=0) == "top_k must be an int >= 0, got None"


def test_custom_error_type():
    with pytest.raises(InputTypeError, match=re.escape("batch_size must be an int >= 1, got 0")) as e:
        check_int("batch_size", 0, minimum=1, error=InputTypeError)
    assert isinstance(e.value, HypervocabError) and isinstance(e.value, TypeError)
    with pytest.raises(ValueError, match=re.escape("k must be an int >= 1, got 0")) as e2:
        check_int("k", 0, minimum=1, error=ValueError)
    assert not isinstance(e2.value, HypervocabError)
    # the default is a ConfigError, which is also a ValueError
    with pytest.raises(ValueError):
        check_int("k", 0, minimum=1)


def test_errors_module_stays_light():
    """errors.py imports only the standard library (no NumPy, no torch): every module can import it."""
    tree = ast.parse(Path(hypervocab.errors.__file__).read_text())
    imported = {alias.name.partition(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").partition(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
