"""The worked examples of docs/design.md section 4, checked in both directions."""

import numpy as np
import pytest

from hypervocab import Codebook, LZWCodec

# (ids, codes, codebook, settings) -- V=10, C=100, M=4 unless stated
GOLDEN = [
    ([1, 1, 1], [1, 10], {10: [1, 1]}, {}),
    ([1] * 7, [1, 10, 11, 1], {10: [1, 1], 11: [1, 1, 1], 12: [1, 1, 1, 1]}, {}),
    ([1] * 12, [1, 10, 11, 12, 10], {10: [1, 1], 11: [1, 1, 1], 12: [1, 1, 1, 1]}, {}),
    ([1, 2, 1, 2, 1, 2, 1], [1, 2, 10, 12], {10: [1, 2], 11: [2, 1], 12: [1, 2, 1]}, {}),
    ([1, 2, 9, 1, 2, 1, 2], [1, 2, 9, 10, 10], {10: [1, 2], 11: [1, 2, 1]}, {"disabled_ids": [9]}),
    ([1, 2, 3] * 3, [1, 2, 3, 10, 3, 10, 3], {10: [1, 2], 11: [2, 3]}, {"C": 2}),
    ([1, 2, 3] * 4, [1, 2, 3, 10, 12, 11, 13],
     {10: [1, 2], 11: [2, 3], 12: [3, 1], 13: [1, 2, 3], 14: [3, 1, 2], 15: [2, 3, 1]}, {"M": 3}),
]


def make(opts: dict) -> LZWCodec:
    return LZWCodec(10, opts.get("C", 100), opts.get("M", 4), disabled_ids=opts.get("disabled_ids", ()))


@pytest.mark.parametrize("ids, codes, book, opts", GOLDEN)
def test_encode_golden(ids, codes, book, opts):
    out, cb = make(opts).encode(ids, return_codebook=True)
    assert out.dtype == np.int64
    assert out.tolist() == codes
    assert cb.to_dict() == book


@pytest.mark.parametrize("ids, codes, book, opts", GOLDEN)
def test_decode_golden(ids, codes, book, opts):
    out, cb = make(opts).decode(codes, return_codebook=True)
    assert out.tolist() == ids
    # the decoder learns every entry the codes refer to, and the encoder's entries in the same order
    assert list(cb.to_dict().items()) == list(book.items())[: len(cb)]


def test_missed_merges_rebuild_the_same_codebook():
    # a model that wrote base ids instead of hypertokens: same text, same entries
    codec = LZWCodec(10, 100, 4)
    written = [1, 2, 1, 2, 1, 2, 1]
    ids, cb = codec.decode(written, return_codebook=True)
    assert ids.tolist() == written
    assert cb.to_dict() == {10: [1, 2], 11: [2, 1], 12: [1, 2, 1]}
    # writing 1, 2 plainly leaves P = (1, 2); the next new id 12 then means P + P[0] (the "KwKwK" case)
    assert codec.decode([1, 2, 1, 2, 12]).tolist() == [1, 2, 1, 2, 1, 2, 1]


def test_codebook_views():
    codes, cb = LZWCodec(10, 100, 4).encode([1, 2, 1, 2, 1, 2, 1], return_codebook=True)
    assert isinstance(cb, Codebook) and len(cb) == 3
    assert cb.phrase(12) == (1, 2, 1) and cb[11] == (2, 1) and cb[5] == (5,)
    assert list(cb.ids) == [10, 11, 12] and 12 in cb and 13 not in cb
    np.testing.assert_array_equal(cb.to_array(), [[1, 2, -1, -1], [2, 1, -1, -1], [1, 2, 1, -1]])
    np.testing.assert_array_equal(cb.to_array(pad_value=0), [[1, 2, 0, 0], [2, 1, 0, 0], [1, 2, 1, 0]])
    np.testing.assert_array_equal(cb.lengths, [2, 2, 3])
    assert [tuple(e) for e in cb.entries()] == [(10, (1, 2)), (11, (2, 1)), (12, (1, 2, 1))]
    assert repr(cb) == "Codebook(3 hypertokens {10: [1, 2], 11: [2, 1], 12: [1, 2, 1]})"


def test_accepts_lists_arrays_and_tensors():
    torch = pytest.importorskip("torch")
    codec = LZWCodec(10, 100, 4)
    expected = [1, 2, 10, 12]
    for ids in ([1, 2, 1, 2, 1, 2, 1], (1, 2, 1, 2, 1, 2, 1), np.array([1, 2, 1, 2, 1, 2, 1], np.int32),
                np.array([1, 2, 1, 2, 1, 2, 1], np.uint16), torch.tensor([1, 2, 1, 2, 1, 2, 1]),
                np.arange(20)[1:15:2] * 0 + np.array([1, 2, 1, 2, 1, 2, 1])):
        assert codec.encode(ids).tolist() == expected
    assert codec.decode(torch.tensor(expected)).tolist() == [1, 2, 1, 2, 1, 2, 1]
    assert codec.encode([]).tolist() == [] and codec.decode([]).tolist() == []
