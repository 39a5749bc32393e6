"""The codec and the compression report on real text with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import multiprocessing
import pickle

import numpy as np
import pytest

from hypervocab import LZWCodec
from hypervocab.cli.main import main
from hypervocab.evaluation import compression_report
from hypervocab.tokenizer import default_disabled_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def codec(smollm2_tokenizer):
    tok = smollm2_tokenizer
    return LZWCodec(len(tok), 2048, 4, disabled_ids=default_disabled_ids(tok), pad_id=tok.pad_token_id)


def test_default_disabled_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    disabled = default_disabled_ids(tok)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert set(digits) <= set(disabled)
    assert set(tok.all_special_ids) <= set(disabled) and tok.pad_token_id in disabled
    assert tok.convert_tokens_to_ids("def") not in disabled
    assert not set(digits) & set(default_disabled_ids(tok, protect_digits=False))


def test_real_code_compresses_and_round_trips(smollm2_tokenizer, codec, stdlib_files):
    tok = smollm2_tokenizer
    texts = [f.read_text(encoding="utf-8") for f in stdlib_files]
    batch = [np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    out = codec.encode_batch(batch, return_codebooks=True)
    n_ids, n_codes = sum(map(len, batch)), int(out.lengths.sum())
    assert 0.5 < n_codes / n_ids < 0.8  # Python code: about 0.62-0.7 codes per token
    for ids, codes in zip(batch, out.codes):
        back = codec.decode(codes)
        np.testing.assert_array_equal(back, ids)
    # digits never end up inside a hypertoken
    digit_ids = {tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    for cb in out.codebooks:
        assert not digit_ids & set(cb.phrases.ravel().tolist())
    assert tok.decode(codec.decode(out.codes[0])) == texts[0]


def _encode_in_worker(args):
    codec, ids = args
    return codec.encode(ids)


def test_codec_works_in_worker_processes(codec, smollm2_tokenizer, stdlib_files):
    ids = [np.array(smollm2_tokenizer(f.read_text(encoding="utf-8"))["input_ids"]) for f in stdlib_files[:4]]
    ctx = multiprocessing.get_context("spawn")  # what DataLoader workers on macOS/Windows do: full pickling
    with ctx.Pool(2) as pool:
        got = pool.map(_encode_in_worker, [(codec, x) for x in ids])
    for g, x in zip(got, ids):
        np.testing.assert_array_equal(g, codec.encode(x))
    state = codec.decoder_state()
    state.push(got[0])
    assert pickle.loads(pickle.dumps(state)) == state


def test_compression_report_and_cli(smollm2_tokenizer, codec, stdlib_files, tmp_path, capsys):
    folder = tmp_path / "code"
    folder.mkdir()
    for f in stdlib_files[:5]:
        (folder / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "blob.bin").write_bytes(b"\0\1\2binary")
    (folder / "skipme").mkdir()
    (folder / "skipme" / "x.py").write_text("print('not counted')\n")
    rows = compression_report([folder, stdlib_files[5]], smollm2_tokenizer, codec, window=512, progress=False,
                              exclude=["skip*"])
    assert [r.path for r in rows] == [str(folder), str(stdlib_files[5]), "total"]
    assert rows[0].files == 5  # the binary file is skipped
    assert rows[-1].tokens == rows[0].tokens + rows[1].tokens
    assert 3.0 < rows[0].bytes_per_token < 5.0 and 0.5 < rows[0].codes_per_token < 0.85
    assert rows[0].bytes_per_code > rows[0].bytes_per_token and 0 < rows[0].hypertoken_share < 0.6
    # the command line prints the same numbers
    from assets import smollm2_tokenizer_dir

    assert main(["compress", str(folder), "--tokenizer", str(smollm2_tokenizer_dir()), "--window", "512",
                 "--exclude", "skip*", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"][0]["codes"] == rows[0].codes and report["rows"][0]["tokens"] == rows[0].tokens
    assert main(["compress", str(folder), "--tokenizer", str(smollm2_tokenizer_dir())]) == 0
    table = capsys.readouterr().out
    assert "| path | files | bytes | tokens | bytes/token |" in table and str(folder) in table
    assert main(["compress", str(tmp_path / "missing"), "--tokenizer", str(smollm2_tokenizer_dir())]) == 2
    assert "is neither a file nor a folder" in capsys.readouterr().err
