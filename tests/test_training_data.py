"""Training windows: lossless, labelled, split by document, cached, parallel, mixed by weight; with real text."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hypervocab import HyperConfig, HyperTokenizer
from hypervocab.errors import ConfigError
from hypervocab.training import data as data_mod
from hypervocab.training.config import DataSource
from hypervocab.training.data import MixtureOrder, WindowSet, build_windows

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    [{"role": "user", "content": "What colour is the sky on Mars?"},
     {"role": "assistant", "content": "Butterscotch by day, bluish near sunset."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Name a prime larger than ten."},
     {"role": "assistant", "content": "Eleven is one."},
     {"role": "user", "content": "And one larger than fifty?"},
     {"role": "assistant", "content": "Fifty-three works nicely."}],
    [{"role": "user", "content": "Say hello hello hello hello hello hello."},
     {"role": "assistant", "content": "Hello hello hello hello hello hello, friend."},
     {"role": "user", "content": "Again, please, again, please."},
     {"role": "assistant", "content": "Hello hello hello hello hello hello, friend, again."}],
]


@pytest.fixture(scope="module")
def codec(smollm2_tokenizer):
    return HyperTokenizer.from_base(smollm2_tokenizer, HyperConfig(max_codebook_size=256, max_subtokens=4)).codec


@pytest.fixture
def code_dir(tmp_path, stdlib_files):
    """A folder of six real Python files (and a binary one, which is skipped)."""
    folder = tmp_path / "code"
    folder.mkdir()
    for f in stdlib_files[:6]:
        shutil.copy(f, folder / f.name)
    (folder / "blob.bin").write_bytes(b"\x00\x01binary")
    return folder


def _build(sources, tok, codec, cache, **kw):
    kw = {"window": 64, "eval_fraction": 0.0, "seed": 0, "progress": False, **kw}
    return build_windows(sources, tok, codec, cache_dir=cache, **kw)


def _doc_ids(tok, text):
    return tok(text)["input_ids"] + [tok.eos_token_id]


def _doc_windows(ws: WindowSet, source: int, doc: int) -> list[int]:
    return list(np.nonzero((ws.source == source) & (ws.doc == doc))[0])


def _assert_same(a: WindowSet, b: WindowSet, fields=("codes", "labels", "n_codes", "base_tokens", "source", "doc")):
    for name in fields:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def _eval_keys(seed, index, keys, fraction):
    """The split rule, written out independently of the module."""
    out = set()
    for key in keys:
        h = hashlib.blake2b(f"{seed}:{index}:{key}".encode(), digest_size=8).digest()
        if int.from_bytes(h, "big") / 2**64 < fraction:
            out.add(key)
    return out


# ------------------------------------------------------------------------------------------- 1. lossless


def test_text_windows_are_lossless_and_fully_labelled(smollm2_tokenizer, codec, code_dir, tmp_path):
    tok, L = smollm2_tokenizer, 64
    train, ev = _build([DataSource(str(code_dir), glob=["*.py", "*.bin"])], tok, codec, tmp_path / "cache",
                       window=L, eval_fraction=0.4, seed=3)
    files = sorted(p for p in code_dir.glob("*.py"))
    expected_eval = _eval_keys(3, 0, [f.name for f in files], 0.4)
    assert 0 < len(expected_eval) < len(files)  # both splits used by this seed
    assert set(ev.doc.tolist()) == {i for i, f in enumerate(files) if f.name in expected_eval}
    assert set(train.doc.tolist()) == {i for i, f in enumerate(files) if f.name not in expected_eval}
    for ws in (train, ev):
        assert ws.codes.shape == ws.labels.shape == (len(ws), L) and ws.codes.dtype == np.int64
        real = np.arange(L)[None, :] < ws.n_codes[:, None]
        assert np.all((ws.n_codes >= 1) & (ws.n_codes <= L))
        assert np.array_equal(ws.labels[real], ws.codes[real])  # every code of text is in the loss, EOS too
        assert np.all(ws.labels[~real] == -100) and np.all(ws.codes[~real] == codec.pad_id)
        assert np.all(ws.source == 0) and not ws.from_cache
    for d, f in enumerate(files):
        ws = ev if f.name in expected_eval else train
        rows = _doc_windows(ws, 0, d)
        decoded = [codec.decode(ws.codes[r, : ws.n_codes[r]]).tolist() for r in rows]
        assert [len(x) for x in decoded] == ws.base_tokens[rows].tolist()
        assert list(itertools.chain.from_iterable(decoded)) == _doc_ids(tok, f.read_text(encoding="utf-8"))
        assert all(ws.n_codes[r] == L for r in rows[:-1])  # only a document's last window is short
    assert len(train) + len(ev) > len(files)  # real files need several windows each

    b = train.batch([0, len(train) - 1])
    width = int(max(train.n_codes[0], train.n_codes[-1]))
    names = ("input_ids", "attention_mask", "labels")
    assert {k: tuple(v.shape) for k, v in b.items()} == dict.fromkeys(names, (2, width))
    assert b["attention_mask"].sum(1).tolist() == [train.n_codes[0], train.n_codes[-1]]
    assert np.array_equal(b["input_ids"].numpy(), train.codes[[0, -1], :width])
    assert np.array_equal(b["labels"].numpy(), train.labels[[0, -1], :width])


# ------------------------------------------------------------------------------------------- 2. chat


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("window", [512, 12])
def test_chat_labels_cover_exactly_the_assistant_turns(smollm2_tokenizer, codec, tmp_path, window):
    tok = smollm2_tokenizer
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    train, ev = _build([DataSource(str(path), kind="chat")], tok, codec, tmp_path / "cache", window=window)
    assert len(ev) == 0 and sorted(set(train.doc.tolist())) == [0, 1, 2]
    for d, messages in enumerate(CONVERSATIONS):
        rendered = tok.apply_chat_template(messages, tokenize=False)
        # expected loss tokens, found from the rendered text itself: each reply with the end of its turn
        spans, pos = [], 0
        for m in messages:
            piece = m["content"] + "<|im_end|>\n"
            at = rendered.index(piece if m["role"] == "assistant" else m["content"], pos)
            pos = at + len(m["content"])
            if m["role"] == "assistant":
                spans.append((at, at + len(piece)))
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        token_loss = np.array([any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]])
        rows = _doc_windows(train, 0, d)
        ids, loss_ids = [], []
        for r in rows:
            n = train.n_codes[r]
            codes, labels = train.codes[r, :n], train.labels[r, :n]
            ids_w, book = codec.decode(codes, return_codebook=True)
            lengths = book.code_lengths(codes)
            starts = len(ids) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            want = np.array([token_loss[s: s + k].all() for s, k in zip(starts, lengths)])
            assert np.array_equal(labels != -100, want)
            assert np.array_equal(labels[want], codes[want])
            ids += ids_w.tolist()
            loss_ids += [t for c in codes[want] for t in book.phrase(c)]
        assert ids == enc["input_ids"]  # lossless, no EOS appended to chat
        replies = "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
        assert tok.decode([t for t, keep in zip(ids, token_loss) if keep]) == replies
        loss_text = tok.decode(loss_ids)
        if d == 2 and window == 512:
            # one window holds the whole conversation; "\nHello" was seen in the first reply, so in the second
            # a hypertoken joins the assistant header's newline to "Hello": not all assistant, so not in the loss
            parts = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
            assert loss_text == parts[0] + parts[1].removeprefix("Hello")
        else:
            assert loss_text == replies
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"] not in loss_text
        assert "user" not in loss_text and "system" not in loss_text


def test_chat_from_a_saved_dataset_equals_chat_jsonl(smollm2_tokenizer, codec, tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = smollm2_tokenizer
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    datasets.Dataset.from_dict({"messages": CONVERSATIONS}).save_to_disk(str(tmp_path / "hf"))
    a, _ = _build([DataSource(str(path), kind="chat")], tok, codec, tmp_path / "cache", window=16)
    b, _ = _build([DataSource(str(tmp_path / "hf"))], tok, codec, tmp_path / "cache", window=16)
    _assert_same(a, b)
    assert (a.labels == -100).any() and (a.labels != -100).any()


# ------------------------------------------------------------------------------------------- 3. formats


def test_jsonl_and_saved_dataset_equal_text_files(smollm2_tokenizer, codec, tmp_path, stdlib_files):
    datasets = pytest.importorskip("datasets")
    tok = smollm2_tokenizer
    texts = [f.read_text(encoding="utf-8") for f in stdlib_files[6:9]] + ["short one", "naïve café ✓\r\nline two"]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_bytes(t.encode("utf-8"))
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    with open(jsonl, "a") as f:
        f.write("\n   \n")  # blank lines are not documents
    splits = {"train": datasets.Dataset.from_dict({"text": texts}),
              "test": datasets.Dataset.from_dict({"text": ["not read"]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hf"))
    cache = tmp_path / "cache"
    ref, _ = _build([DataSource(str(folder), glob=["*.txt"])], tok, codec, cache)
    assert sorted(set(ref.doc.tolist())) == list(range(len(texts)))
    for src in (DataSource(str(jsonl)), DataSource(str(tmp_path / "hf")), DataSource(str(jsonl), kind="jsonl")):
        got, _ = _build([src], tok, codec, cache)
        _assert_same(ref, got)
    for d, t in enumerate(texts):
        rows = _doc_windows(ref, 0, d)
        decoded = (codec.decode(ref.codes[r, : ref.n_codes[r]]).tolist() for r in rows)
        assert list(itertools.chain.from_iterable(decoded)) == _doc_ids(tok, t)


# ------------------------------------------------------------------------------------------- 4. split


def test_split_is_by_document_and_deterministic(smollm2_tokenizer, codec, tmp_path):
    tok = smollm2_tokenizer
    path = _write_jsonl(tmp_path / "many.jsonl", [{"text": f"document number {i}: " + "abc " * (i % 7)}
                                                   for i in range(200)])
    splits = {}
    for run, seed in (("a", 5), ("b", 5), ("c", 6)):  # separate caches: every run tokenizes
        train, ev = _build([DataSource(str(path))], tok, codec, tmp_path / f"cache-{run}", window=4,
                           eval_fraction=0.25, seed=seed)
        assert not train.from_cache and not ev.from_cache
        train_docs, eval_docs = set(train.doc.tolist()), set(ev.doc.tolist())
        assert train_docs.isdisjoint(eval_docs) and train_docs | eval_docs == set(range(200))
        assert eval_docs == {i for i in range(200) if f"many.jsonl:{i + 1}" in
                             _eval_keys(seed, 0, [f"many.jsonl:{i + 1}"], 0.25)}
        splits[run] = eval_docs
    assert splits["a"] == splits["b"] and splits["a"] != splits["c"]
    assert 30 <= len(splits["a"]) <= 70 and 30 <= len(splits["c"]) <= 70


# ------------------------------------------------------------------------------------------- 5. cache


def test_cache_is_reused_until_something_changes(smollm2_tokenizer, codec, code_dir, tmp_path):
    tok, cache = smollm2_tokenizer, tmp_path / "cache"
    sources = [DataSource(str(code_dir), glob=["*.py"]), DataSource(str(code_dir / next(iter(
        sorted(p.name for p in code_dir.glob("*.py"))))), weight=3.0)]
    first = _build(sources, tok, codec, cache, eval_fraction=0.3)
    again = _build(sources, tok, codec, cache, eval_fraction=0.3)
    for a, b in zip(first, again):
        assert not a.from_cache and b.from_cache
        _assert_same(a, b)
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 4 and all((cache / f / "meta.json").is_file() for f in folders)  # 2 sources x 2 splits
    assert not any(f.startswith(".") for f in folders)  # no temp folder left behind

    reweighted = [DataSource(s.path, glob=s.glob, weight=7.0) for s in sources]
    assert _build(reweighted, tok, codec, cache, eval_fraction=0.3)[0].from_cache  # weight does not shape windows
    assert not _build(sources, tok, codec, cache, eval_fraction=0.3, window=32)[0].from_cache
    assert not _build(sources, tok, codec, cache, eval_fraction=0.3, seed=1)[0].from_cache

    victim = max(code_dir.glob("*.py"))
    victim.write_text(victim.read_text() + "\nprint('changed')\n")
    changed = _build(sources, tok, codec, cache, eval_fraction=0.3)
    assert not changed[0].from_cache
    assert len(list(cache.iterdir())) == 4 + 4 + 4 + 2  # the untouched single-file source still hit its cache


# ------------------------------------------------------------------------------------------- 6. workers


def test_workers_give_the_same_arrays(smollm2_tokenizer, codec, code_dir, tmp_path, monkeypatch):
    tok = smollm2_tokenizer
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    sources = [DataSource(str(code_dir), glob=["*.py"]), DataSource(str(chat), kind="chat")]
    monkeypatch.setattr(data_mod, "_CHUNK_DOCS", 2)  # several chunks, so both workers get some
    one = _build(sources, tok, codec, tmp_path / "c1", eval_fraction=0.3, window=48, num_workers=1)
    two = _build(sources, tok, codec, tmp_path / "c2", eval_fraction=0.3, window=48, num_workers=2)
    for a, b in zip(one, two):
        _assert_same(a, b)
    assert set(one[0].source.tolist()) | set(one[1].source.tolist()) == {0, 1}


# ------------------------------------------------------------------------------------------- 7. mixture


def _synthetic(counts: list[int], L: int = 4) -> WindowSet:
    source = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    n = len(source)
    codes = np.arange(n * L, dtype=np.int64).reshape(n, L)
    return WindowSet(codes, codes.copy(), np.full(n, L, np.int64), np.full(n, L, np.int64), source)


def test_mixture_order_is_deterministic_weighted_and_exhaustive():
    train = _synthetic([30, 0, 7])  # source 1 has no training window: never drawn
    order = MixtureOrder(train, [3.0, 5.0, 1.0], seed=11)
    draws = order.indices(0, 4000)
    assert draws.dtype == np.int64 and draws.shape == (4000,)
    assert np.array_equal(draws, MixtureOrder(train, [3.0, 5.0, 1.0], seed=11).indices(0, 4000))
    assert not np.array_equal(draws, MixtureOrder(train, [3.0, 5.0, 1.0], seed=12).indices(0, 4000))
    src = train.source[draws]
    assert not (src == 1).any()
    assert abs((src == 0).mean() - 0.75) < 0.03
    for s, n in ((0, 30), (2, 7)):
        mine = draws[src == s]
        own = np.nonzero(train.source == s)[0]
        for p in range(len(mine) // n):  # every pass is a permutation of the source's windows
            assert sorted(mine[p * n: (p + 1) * n].tolist()) == own.tolist()
        assert not np.array_equal(mine[:n], mine[n: 2 * n])  # reshuffled each pass


def test_mixture_order_does_not_depend_on_chunking():
    train = _synthetic([5, 13, 2])
    weights = [1.0, 2.0, 0.5]
    whole = MixtureOrder(train, weights, seed=0).indices(0, 10000)
    order = MixtureOrder(train, weights, seed=0)
    assert np.array_equal(np.concatenate([order.indices(0, 4), order.indices(4, 6)]), whole[:10])
    cuts = [0, 1, 7, 4095, 4096, 4097, 6000, 8191, 8193, 10000]  # across block boundaries
    assert np.array_equal(np.concatenate([order.indices(a, b - a) for a, b in itertools.pairwise(cuts)]), whole)
    fresh = MixtureOrder(train, weights, seed=0)  # random access: a resumed run starts mid-stream
    assert np.array_equal(fresh.indices(9000, 1000), whole[9000:])
    assert np.array_equal(fresh.indices(3, 5), whole[3:8])
    assert fresh.indices(10, 0).shape == (0,)


# ------------------------------------------------------------------------------------------- 8. errors


def test_jsonl_errors_name_file_line_and_field(smollm2_tokenizer, codec, tmp_path):
    tok = smollm2_tokenizer
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(ConfigError) as e:
        _build([DataSource(str(path))], tok, codec, tmp_path / "cache")
    assert str(e.value) == f"{path}:2: no field 'text' (text_field) in this line, got keys ['body']"
    path.write_text('{"text": "fine"}\n\nnot json\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: not a JSON object .*'text' \(text_field\)"):
        _build([DataSource(str(path))], tok, codec, tmp_path / "cache")
    path.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: field 'messages' \(messages_field\) must be"):
        _build([DataSource(str(path), kind="chat")], tok, codec, tmp_path / "cache")


def test_source_without_documents_is_an_error(smollm2_tokenizer, codec, tmp_path):
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\x00\x00")
    (folder / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    (folder / "c.txt").write_text("")
    ok = tmp_path / "ok.txt"
    ok.write_text("some text")
    with pytest.raises(ConfigError) as e:
        _build([DataSource(str(ok)), DataSource(str(folder))], smollm2_tokenizer, codec, tmp_path / "cache")
    assert str(e.value).startswith(f"data[1] ({str(folder)!r}) yields no document (kind 'text', glob ['**/*'])")
    with pytest.raises(ConfigError, match=r"data\[0\]\.path .* does not exist"):
        _build([DataSource(str(tmp_path / "missing.txt"))], smollm2_tokenizer, codec, tmp_path / "cache")


def test_chat_needs_an_incremental_chat_template(smollm2_tokenizer, codec, tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    plain = copy.deepcopy(smollm2_tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError, match=r"^data\[0\] \('.*chat.jsonl'\) holds chat data but the tokenizer "
                                          r".* has no chat template"):
        _build([DataSource(str(path), kind="chat")], plain, codec, tmp_path / "cache")
    counting = copy.deepcopy(smollm2_tokenizer)
    # the number of messages first: an earlier part of a conversation renders differently
    counting.chat_template = ("{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                              "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: the tokenizer's chat template is not "
                                          r"incremental"):
        _build([DataSource(str(path), kind="chat")], counting, codec, tmp_path / "cache2")


def test_bad_arguments(smollm2_tokenizer, codec, tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("text")
    for kw, msg in (({"window": 0}, "window must be an int >= 1, got 0"),
                    ({"eval_fraction": 1.0}, r"eval_fraction must be a number in \[0, 1\), got 1.0"),
                    ({"num_workers": 0}, "num_workers must be an int >= 1, got 0")):
        with pytest.raises(ConfigError, match=msg):
            _build([DataSource(str(ok))], smollm2_tokenizer, codec, tmp_path / "cache", **kw)
    with pytest.raises(ConfigError, match=r"weights\[1\] must be a finite number > 0, got 0"):
        MixtureOrder(_synthetic([2, 2]), [1.0, 0], seed=0)
    with pytest.raises(ConfigError, match="no training windows"):
        MixtureOrder(_synthetic([0, 0]), [1.0, 1.0], seed=0)
