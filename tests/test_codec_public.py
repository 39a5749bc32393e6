"""Exact agreement with the public zip2zip-compression 0.3.4 codec, on random configurations.

Where the public codec panics, or silently accepts a code that was never
defined, there is nothing to agree with: those inputs are tested in
test_codec_errors.py.  One documented difference: when a model's stream
defines a phrase that already has an id (possible only off the encoder's
path), the public ``Codebook`` listing keeps only the newer id; both ids
stay valid codes in both codecs, and ours lists both.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervocab import LZWCodec

from .conftest import codec_settings, id_sequences, model_stream

zip2zip_compression = pytest.importorskip("zip2zip_compression", reason="pip install zip2zip-compression==0.3.4")


def public(V, C, M, disabled, pad):
    # the public codec always treats its pad id as disabled; without a pad, give it one no input uses
    return zip2zip_compression.LZWCompressor(V, C, M, V + C + 1 if pad is None else pad, list(disabled))


def assert_same_codebook(ours, theirs_dict, V):
    theirs = {k: tuple(v) for k, v in theirs_dict.items()}
    for k, phrase in theirs.items():
        assert ours.phrase(k) == phrase
    for k in ours.ids:  # ids missing from the public listing are older ids of a repeated phrase
        if k not in theirs:
            assert any(p == ours.phrase(k) and j > k for j, p in theirs.items())


@given(st.data())
def test_encode_matches_public(data):
    V, C, M, disabled, pad = data.draw(codec_settings())
    ids = data.draw(id_sequences(V))
    codes, cb = LZWCodec(V, C, M, disabled_ids=disabled, pad_id=pad).encode(ids, return_codebook=True)
    p_codes, _, p_cb = public(V, C, M, disabled, pad).encode(ids)
    assert codes.tolist() == p_codes
    assert cb.to_dict() == p_cb.to_dict()


@given(st.data())
def test_decode_of_canonical_streams_matches_public(data):
    V, C, M, disabled, pad = data.draw(codec_settings())
    ids = data.draw(id_sequences(V))
    codec = LZWCodec(V, C, M, disabled_ids=disabled, pad_id=pad)
    codes = codec.encode(ids)
    out, cb = codec.decode(codes, return_codebook=True)
    p_out, p_cb = public(V, C, M, disabled, pad).decode(codes.tolist())
    assert out.tolist() == p_out == ids
    assert cb.to_dict() == p_cb.to_dict()


@given(st.data())
def test_decode_of_missed_merges_matches_public(data):
    """Streams a model may write: each code is any id valid at its position, hypertokens often."""
    V, C, M, disabled, pad = data.draw(codec_settings())
    codec = LZWCodec(V, C, M, disabled_ids=disabled, pad_id=pad)
    stream = model_stream(data, codec)
    out, cb = codec.decode(stream, return_codebook=True)
    p_out, p_cb = public(V, C, M, disabled, pad).decode(stream)
    assert out.tolist() == p_out
    assert_same_codebook(cb, p_cb.to_dict(), V)


@given(st.data())
def test_decode_of_expanded_hypertokens_matches_public(data):
    """Encode, then write some hypertokens as their base ids (what a model does when it misses a merge)."""
    V, C, M, disabled, pad = data.draw(codec_settings())
    codec = LZWCodec(V, C, M, disabled_ids=disabled, pad_id=pad)
    codes, cb = codec.encode(data.draw(id_sequences(V)), return_codebook=True)
    expand = data.draw(st.lists(st.booleans(), min_size=len(codes), max_size=len(codes)))
    stream = [x for c, e in zip(codes.tolist(), expand) for x in (cb.phrase(c) if e else (c,))]
    try:
        out, ours = codec.decode(stream, return_codebook=True)
    except ValueError:
        return  # ids were renumbered by the change; an invalid stream is covered elsewhere
    p_out, p_cb = public(V, C, M, disabled, pad).decode(stream)
    assert out.tolist() == p_out
    assert_same_codebook(ours, p_cb.to_dict(), V)


@given(st.data())
def test_encode_batch_matches_public(data):
    V, C, M, disabled, _ = data.draw(codec_settings())
    pad = data.draw(st.integers(0, V - 1))
    batch = data.draw(st.lists(id_sequences(V, max_len=40), min_size=1, max_size=5))
    max_length = data.draw(st.integers(1, 50))
    codec = LZWCodec(V, C, M, disabled_ids=disabled, pad_id=pad)
    ours = codec.encode_batch(batch, padding="max_length", truncation=True, max_length=max_length)
    p_codes, p_mask, _ = public(V, C, M, disabled, pad).batch_encode(batch, "max_length", True, max_length)
    assert ours.codes.tolist() == p_codes
    # the public mask also hides pad ids inside a sequence; ours marks exactly the padding it added
    inner = [[int(c != pad) for c in row] for row in ours.codes.tolist()]
    assert [[m & i for m, i in zip(a, b)] for a, b in zip(ours.attention_mask.tolist(), inner)] == p_mask
