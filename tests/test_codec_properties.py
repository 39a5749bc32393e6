"""Property tests of the compiled codec against the pure-Python oracle and against itself."""

from __future__ import annotations

import pickle

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from hypervocab import DecoderState, InvalidCodeError, LZWCodec
from hypervocab.reference_codec import reference_decode, reference_encode

from .conftest import codec_settings, id_sequences, model_stream


def build(settings) -> LZWCodec:
    V, C, M, disabled, pad = settings
    return LZWCodec(V, C, M, disabled_ids=disabled, pad_id=pad)


@given(st.data())
def test_encode_matches_oracle_and_round_trips(data):
    codec = build(data.draw(codec_settings()))
    ids = data.draw(id_sequences(codec.base_vocab_size))
    codes, cb = codec.encode(ids, return_codebook=True)
    ref_codes, ref_entries = reference_encode(ids, codec.base_vocab_size, codec.max_codebook_size,
                                              codec.max_subtokens, codec.disabled_ids)
    assert codes.tolist() == ref_codes
    assert [cb.phrase(i) for i in cb.ids] == ref_entries
    assert len(codes) <= len(ids)
    assert codec.decode(codes).tolist() == ids
    assert codec.decode(codes, return_codebook=True)[1] == cb


@given(st.data())
def test_decode_matches_oracle_on_model_streams(data):
    codec = build(data.draw(codec_settings()))
    stream = model_stream(data, codec)
    ids, cb = codec.decode(stream, return_codebook=True)
    ref_ids, ref_entries = reference_decode(stream, codec.base_vocab_size, codec.max_codebook_size,
                                            codec.max_subtokens, codec.disabled_ids)
    assert ids.tolist() == ref_ids
    assert [cb.phrase(i) for i in cb.ids] == ref_entries


@given(st.data())
def test_strict_rejects_exactly_what_the_oracle_rejects(data):
    codec = build(data.draw(codec_settings()))
    V, C = codec.base_vocab_size, codec.max_codebook_size
    junk = data.draw(st.lists(st.integers(-3, V + C + 3), max_size=25))
    try:
        expected = reference_decode(junk, V, C, codec.max_subtokens, codec.disabled_ids)[0]
    except ValueError:
        expected = None
    try:
        got = codec.decode(junk).tolist()
    except InvalidCodeError:
        got = None
    assert got == expected
    # the lenient modes never raise: "ignore" drops bad codes, "replace" writes the replacement id
    ignored = codec.decode(junk, errors="ignore")
    if codec.pad_id is not None:
        replaced = codec.decode(junk, errors="replace")
        assert len(replaced) >= len(ignored)
    if expected is not None:
        assert ignored.tolist() == expected


@given(st.data())
def test_online_equals_offline(data):
    codec = build(data.draw(codec_settings()))
    stream = model_stream(data, codec)
    state = codec.decoder_state()
    pieces, installed = [], []
    i = 0
    while i < len(stream):  # push in random chunk sizes, one code at a time included
        k = data.draw(st.integers(1, 4))
        step = state.push(stream[i: i + k])
        pieces.extend(step.ids.tolist())
        installed.extend(step.installed)
        i += k
    ids, cb = codec.decode(stream, return_codebook=True)
    assert pieces == ids.tolist()
    assert state.codebook == cb
    assert [tuple(e) for e in installed] == [tuple(e) for e in cb.entries()]


@given(st.data())
def test_push_batch_equals_single_pushes(data):
    settings = data.draw(codec_settings())
    codec = build(settings)
    streams = [model_stream(data, codec, max_len=20) for _ in range(data.draw(st.integers(1, 4)))]
    T = min(len(s) for s in streams)
    batch = [codec.decoder_state() for _ in streams]
    single = [codec.decoder_state() for _ in streams]
    for t in range(T):
        got = DecoderState.push_batch(batch, np.array([s[t] for s in streams]))
        want = [(b, e.id, e.phrase) for b, s in enumerate(streams) for e in single[b].push(s[t]).installed]
        assert got == want
    assert batch == single


@given(st.data())
def test_batch_equals_single(data):
    codec = build(data.draw(codec_settings()))
    seqs = data.draw(st.lists(id_sequences(codec.base_vocab_size, max_len=50), max_size=6))
    threads = data.draw(st.integers(1, 4))
    out = codec.encode_batch(seqs, return_codebooks=True, num_threads=threads)
    for s, codes, cb, n in zip(seqs, out.codes, out.codebooks, out.num_base_tokens):
        want, want_cb = codec.encode(s, return_codebook=True)
        assert codes.tolist() == want.tolist() and cb == want_cb and n == len(s)
    back, books = codec.decode_batch(out.codes, return_codebooks=True, num_threads=threads)
    assert [b.tolist() for b in back] == seqs
    assert books == out.codebooks


@given(st.data())
def test_padded_batch_equals_single(data):
    V, C, M, disabled, _ = data.draw(codec_settings())
    codec = LZWCodec(V, C, M, disabled_ids=disabled, pad_id=data.draw(st.integers(0, V - 1)))
    seqs = data.draw(st.lists(id_sequences(V, max_len=40), min_size=1, max_size=5))
    side = data.draw(st.sampled_from(["left", "right"]))
    max_length = data.draw(st.integers(1, 45))
    out = codec.encode_batch(seqs, padding="max_length", truncation=True, max_length=max_length, padding_side=side)
    assert out.codes.shape == out.attention_mask.shape == (len(seqs), max_length)
    for row, mask, s, n in zip(out.codes, out.attention_mask, seqs, out.num_base_tokens):
        kept = row[mask == 1]
        assert kept.tolist() == codec.encode(s[:n]).tolist()  # truncation = encoding the ids it covers
        assert kept.tolist() == codec.encode(s).tolist()[:max_length]  # ... = the first codes of the whole
        real = np.flatnonzero(mask)
        if len(real):  # padding sits on the requested side only
            assert (real == np.arange(real[0], real[0] + len(real))).all()
            assert real[-1] == max_length - 1 if side == "left" else real[0] == 0
    back = codec.decode_batch(out.codes, attention_mask=out.attention_mask)
    assert [b.tolist() for b in back] == [s[:n] for s, n in zip(seqs, out.num_base_tokens)]


@given(st.data())
def test_windows_tile_the_document(data):
    codec = build(data.draw(codec_settings()))
    ids = data.draw(id_sequences(codec.base_vocab_size, max_len=150))
    L = data.draw(st.integers(1, 12))
    windows = codec.encode_windows(ids, L, return_codebooks=True)
    if not ids:
        assert windows == []
        return
    assert [w.start for w in windows] == [0] + [w.stop for w in windows[:-1]]  # no id lost or repeated
    assert (windows[-1].stop if windows else 0) == len(ids)
    for i, w in enumerate(windows):
        codes, cb = codec.encode(ids[w.start: w.stop], return_codebook=True)
        assert w.codes.tolist() == codes.tolist() and w.codebook == cb
        assert len(w.codes) == L if i < len(windows) - 1 else 1 <= len(w.codes) <= L
    assert sum((codec.decode(w.codes).tolist() for w in windows), []) == ids


@given(st.data())
def test_pickle_round_trips(data):
    codec = build(data.draw(codec_settings()))
    stream = model_stream(data, codec, max_len=30)
    state = codec.decoder_state()
    state.push(stream)
    codec2, state2 = pickle.loads(pickle.dumps((codec, state)))
    assert codec2 == codec and state2 == state
    cb = state.codebook
    assert pickle.loads(pickle.dumps(cb)) == cb
    # the restored state carries on exactly as the original
    more = model_stream(data, codec, max_len=0)  # empty continuation keeps hypothesis cheap
    assert state2.push(more).ids.tolist() == state.push(more).ids.tolist()
    for c in range(state.num_valid_codes):
        a, b = state.copy(), state2.copy()
        step_a, step_b = a.push(c), b.push(c)
        assert step_a.ids.tolist() == step_b.ids.tolist() and step_a.installed == step_b.installed
        assert a == b


@given(st.data())
def test_copy_is_a_snapshot(data):
    codec = build(data.draw(codec_settings()))
    stream = model_stream(data, codec)
    state = codec.decoder_state()
    cut = data.draw(st.integers(0, len(stream)))
    state.push(stream[:cut])
    snap = state.copy()
    before = (state.codebook, state.pending)
    state.push(stream[cut:])
    assert (snap.codebook, snap.pending) == before  # untouched by later pushes
    snap.push(stream[cut:])
    assert snap == state  # and rolling forward again gives the same state
    state.reset()
    assert len(state) == 0 and state.pending == () and state == codec.decoder_state()


@given(st.data())
def test_next_phrase_is_the_one_rule(data):
    """The scalar KwKwK rule (DecoderState.next_phrase), the array one for training (next_candidates) and
    what the decoder accepts agree at every step of a stream."""
    from hypervocab.codebook import next_candidates

    codec = build(data.draw(codec_settings()))
    V, C, M = codec.base_vocab_size, codec.max_codebook_size, codec.max_subtokens
    state = codec.decoder_state()
    for code in model_stream(data, codec):
        phrase = state.next_phrase
        pending = np.full(M, -1, np.int64)
        pending[: len(state.pending)] = state.pending
        row = next_candidates(pending[None], np.array([len(state)]), C)[0]
        assert (tuple(int(t) for t in row if t >= 0) or None) == phrase
        assert state.num_valid_codes == V + len(state) + (phrase is not None)
        if phrase is not None:
            probe = state.copy()
            assert tuple(probe.push(state.next_id).ids) == phrase
        state.push(code)
