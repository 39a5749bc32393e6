"""Bad input: clear errors naming the argument, the value and what is allowed; never a crash or a half-update."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervocab import DecoderState, LZWCodec
from hypervocab.errors import (
    CodeTypeError,
    ConfigError,
    HypervocabError,
    InputTypeError,
    InvalidCodeError,
    InvalidTokenError,
    TokenTypeError,
)


def test_hierarchy():
    assert issubclass(InvalidCodeError, ValueError) and issubclass(InvalidCodeError, HypervocabError)
    assert issubclass(InvalidTokenError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(CodeTypeError, InvalidCodeError) and issubclass(CodeTypeError, TypeError)
    assert issubclass(TokenTypeError, InvalidTokenError) and issubclass(TokenTypeError, InputTypeError)


@pytest.mark.parametrize("args, kwargs, message", [
    ((0, 10, 4), {}, "base_vocab_size must be an int in [1, 16777216], got 0"),
    ((10.0, 10, 4), {}, "base_vocab_size must be an int in [1, 16777216], got 10.0"),
    ((10, -1, 4), {}, "max_codebook_size must be an int in [0, 2147483637], got -1"),
    ((2**25, 1, 4), {}, "base_vocab_size must be an int in [1, 16777216], got 33554432"),
    ((10, 10, 0), {}, "max_subtokens must be an int in [1, 65536], got 0"),
    ((10, 10, True), {}, "max_subtokens must be an int in [1, 65536], got True"),
    ((10, 10, 4), {"disabled_ids": [3, 10]}, "disabled_ids[1] must be an int in [0, 9], got 10"),
    ((10, 10, 4), {"disabled_ids": "abc"}, "disabled_ids must be an iterable of ints, got str"),
    ((10, 10, 4), {"pad_id": -1}, "pad_id must be an int in [0, 9], got -1"),
    ((10, 10, 4), {"replacement_id": 12}, "replacement_id must be an int in [0, 9], got 12"),
])
def test_constructor_validation(args, kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        LZWCodec(*args, **kwargs)


def test_encode_rejects_ids_outside_the_vocabulary():
    codec = LZWCodec(10, 100, 4, pad_id=0)
    with pytest.raises(InvalidTokenError, match=re.escape(
            "ids[2] = 10 is not a base id: ids to encode must be in [0, 10) (base_vocab_size=10)")):
        codec.encode([1, 2, 10])
    with pytest.raises(InvalidTokenError, match=re.escape("ids[0] = -5 is not a base id")):
        codec.encode(np.array([-5, 1]))
    with pytest.raises(InvalidTokenError, match=re.escape("batch[1][3] = 99 is not a base id")):
        codec.encode_batch([[1, 2], [1, 2, 3, 99]])
    with pytest.raises(InvalidTokenError, match=re.escape("ids[7] = 11 is not a base id")):
        codec.encode_windows([1, 1, 1, 1, 1, 1, 1, 11], 2)  # position counted in the whole document


@pytest.mark.parametrize("bad, message", [
    ([1.0, 2.0], "ids must hold integers, got float at ids[0]"),
    (np.array([1.0, 2.0]), "ids must hold integers, got dtype float64"),
    (np.array([True, False]), "ids must hold integers, got dtype bool"),
    ([[1, 2], [3, 4]], "ids must be 1-D, got an array of shape (2, 2)"),
    ("abc", "ids must be a 1-D sequence of integers (list, NumPy array or torch tensor), got str"),
    (None, "ids must be a 1-D sequence of integers (list, NumPy array or torch tensor), got NoneType"),
    ([1, "a"], "ids must hold integers, got str at ids[1]"),
    ([1, 2**70], "ids[1] = 1180591620717411303424 is too large for int64"),
    ([1, None], "ids must hold integers, got NoneType at ids[1]"),
    (np.array([1, 2**64 - 1], dtype=np.uint64), "ids[1] = 18446744073709551615 is too large for int64"),
])
def test_encode_rejects_wrong_types(bad, message):
    with pytest.raises(TokenTypeError, match=re.escape(message)):
        LZWCodec(10, 100, 4).encode(bad)


@pytest.mark.parametrize("codes, message", [
    ([1, 12], "codes[1] = 12 cannot be decoded: hypertoken 12 is not defined yet: no entry exists at this point "
              "(the first will be 10); valid codes here are [0, 11)"),
    ([1, 2, 1, 14], "codes[3] = 14 cannot be decoded: hypertoken 14 is not defined yet: only 2 entries exist at "
                    "this point (ids 10..11); valid codes here are [0, 13)"),
    ([10], "codes[0] = 10 cannot be decoded: the next new id 10 may only follow a code it extends, and nothing "
           "precedes it here; valid codes here are [0, 10)"),
    ([1, -1], "codes[1] = -1 cannot be decoded: codes are never negative; valid codes here are [0, 11)"),
    ([110], "codes[0] = 110 cannot be decoded: the id space ends at base_vocab_size + max_codebook_size = 110"),
    ([1, 9, 10], "codes[2] = 10 cannot be decoded: the next new id 10 may only follow a code it extends"),
])
def test_decode_names_position_code_and_what_is_valid(codes, message):
    with pytest.raises(InvalidCodeError, match=re.escape(message)):
        LZWCodec(10, 100, 4, disabled_ids=[9]).decode(codes)


def test_decode_rejects_next_id_after_a_full_phrase():
    with pytest.raises(InvalidCodeError, match=re.escape(
            "the next new id 12 may only follow a phrase shorter than max_subtokens=2")):
        LZWCodec(10, 100, 2).decode([1, 2, 10, 12])
    expected = "the id space ends at base_vocab_size + max_codebook_size = 11"
    with pytest.raises(InvalidCodeError, match=re.escape(expected)):
        LZWCodec(10, 1, 4).decode([1, 2, 11])  # a full codebook: the next id would be past the end


def test_decode_rejects_wrong_types():
    codec = LZWCodec(10, 100, 4)
    with pytest.raises(CodeTypeError, match=re.escape("codes must hold integers, got dtype float32")):
        codec.decode(np.array([1, 2], np.float32))
    with pytest.raises(InvalidCodeError, match=re.escape("codes must be 1-D, got an array of shape (1, 2)")):
        codec.decode(np.array([[1, 2]]))
    with pytest.raises(ConfigError, match=re.escape("errors must be 'strict', 'replace' or 'ignore', got 'lax'")):
        codec.decode([1], errors="lax")
    with pytest.raises(ConfigError, match=re.escape("errors='replace' needs an id to write")):
        codec.decode([1], errors="replace")
    with pytest.raises(InvalidCodeError, match=re.escape("batch[1][0] = 50 cannot be decoded")):
        codec.decode_batch([[1, 2], [50]])


def test_replace_and_ignore_follow_the_documented_rule():
    codec = LZWCodec(10, 100, 4, pad_id=0)
    # an invalid code acts as a boundary: nothing merges across it
    assert codec.decode([1, 2, 77, 1, 2], errors="replace").tolist() == [1, 2, 0, 1, 2]
    assert codec.decode([1, 2, 77, 1, 2], errors="ignore").tolist() == [1, 2, 1, 2]
    ids, cb = codec.decode([1, 2, 77, 1, 2], errors="ignore", return_codebook=True)
    assert cb.to_dict() == {10: [1, 2]}  # no (2, 1): the bad code cut the phrase
    assert LZWCodec(10, 100, 4, pad_id=0, replacement_id=5).decode([3, -4], errors="replace").tolist() == [3, 5]


def test_batch_settings_are_checked():
    codec = LZWCodec(10, 100, 4)
    with pytest.raises(ConfigError, match=re.escape("padding needs a pad id: build the LZWCodec with pad_id=...")):
        codec.encode_batch([[1]], padding=True)
    padded = LZWCodec(10, 100, 4, pad_id=0)
    with pytest.raises(ConfigError, match=re.escape("max_length is required with truncation=True")):
        padded.encode_batch([[1]], truncation=True)
    with pytest.raises(ConfigError, match=re.escape("padding must be one of False, True, 'longest', 'max_length'")):
        padded.encode_batch([[1]], padding="shortest")
    with pytest.raises(ConfigError, match=re.escape("batch[0] has 3 codes, more than max_length=2")):
        padded.encode_batch([[1, 2, 3]], padding="max_length", max_length=2)
    with pytest.raises(ConfigError, match=re.escape("num_threads must be an int in [1, 1024], got 0")):
        padded.encode_batch([[1]], num_threads=0)
    with pytest.raises(TokenTypeError, match=re.escape("batch must be a 2-D array [batch, length]")):
        padded.encode_batch(np.zeros((2, 2, 2), np.int64))


def test_a_failed_push_leaves_the_state_unchanged():
    codec = LZWCodec(10, 100, 4)
    state = codec.decoder_state()
    state.push([1, 2, 1])
    before = state.copy()
    with pytest.raises(InvalidCodeError, match=re.escape("codes[3] = 40 cannot be decoded")):
        state.push([2, 10, 11, 40])  # the first three are fine and install entries: all undone
    assert state == before and len(state) == 2
    with pytest.raises(InvalidCodeError, match=re.escape("codes[1] = 30 cannot be decoded by states[1]")):
        DecoderState.push_batch([state, codec.decoder_state()], [2, 30])
    assert state == before
    assert state.push([2, 10]).ids.tolist() == [2, 1, 2]  # and it carries on normally


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30), st.sampled_from(["strict", "replace", "ignore"]))
def test_no_input_crashes_or_escapes_the_hierarchy(codes, errors):
    codec = LZWCodec(50, 20, 3, pad_id=0)
    state = codec.decoder_state()
    try:
        codec.decode(codes, errors=errors)
        state.push(codes, errors=errors)
    except HypervocabError as e:
        assert errors == "strict" and isinstance(e, ValueError)
        assert len(state) == 0


def test_push_batch_refuses_a_state_given_twice():
    # checked before anything is applied: a state listed twice would be validated against a stale state
    codec = LZWCodec(10, 2, 2, disabled_ids=[9])
    state = codec.decoder_state()
    state.push([1, 2])
    before = state.copy()
    with pytest.raises(InputTypeError, match=re.escape("states[1] appears twice: each state takes one code per step")):
        DecoderState.push_batch([state, state, state], [9, 10, 11])
    assert state == before
    with pytest.raises(InputTypeError, match="states must be a list or tuple of DecoderState objects"):
        DecoderState.push_batch([codec], [1])
    with pytest.raises(CodeTypeError, match=re.escape("code must be an int, got 'x' (str)")):
        state.is_valid("x")
    with pytest.raises(ConfigError, match=re.escape("errors must be 'strict', 'replace' or 'ignore', got []")):
        codec.decode([1], errors=[])


def test_lenient_modes_never_raise_on_huge_integers():
    codec = LZWCodec(10, 100, 4, pad_id=0)
    assert codec.decode([1, 2**63, 2], errors="replace").tolist() == [1, 0, 2]
    assert codec.decode(np.array([1, 2**64 - 1], np.uint64), errors="ignore").tolist() == [1]
    with pytest.raises(CodeTypeError, match=re.escape("codes[1] = 9223372036854775808 is too large for int64")):
        codec.decode([1, 2**63])


def test_a_crafted_pickle_cannot_overflow_a_state():
    import pickle

    codec = LZWCodec(10, 100, 2)
    state = codec.decoder_state()
    state.push([1, 2, 1])
    good = state.__getstate__()
    bad = dict(good, lengths=good["lengths"] + 5)
    with pytest.raises(ValueError, match="inconsistent decoder state"):
        DecoderState.__new__(DecoderState).__setstate__(bad)
    assert pickle.loads(pickle.dumps(state)) == state
