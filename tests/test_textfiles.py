"""One rule for listing and reading folders of text files, used by training and evaluation alike."""

from __future__ import annotations

import os

import pytest

from hypervocab.cli.evaluate import _domains, _texts
from hypervocab.codec import LZWCodec
from hypervocab.errors import ConfigError
from hypervocab.evaluation.compression import compression_report
from hypervocab.textfiles import BINARY_SNIFF_BYTES, list_files, read_text_file
from hypervocab.training.data import _text_documents

LATE_NUL = b"a" * BINARY_SNIFF_BYTES + b"\0tail\n"  # a NUL past the sniffed start: text


@pytest.fixture
def folder(tmp_path):
    """Text at the top and nested, plus what every reader must skip the same way."""
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "top.txt").write_text("top\n")
    (root / "sub" / "nested.py").write_text("print('nested')\n")
    (root / "sub" / "deeper" / "deep.txt").write_text("deep\n")
    (root / "sub" / "b-late-nul.txt").write_bytes(LATE_NUL)
    (root / "sub-x.txt").write_text("'-' < '/': listed before sub/\n")
    (root / "latin1.txt").write_bytes("café\n".encode("latin-1"))  # not UTF-8: skipped
    (root / "binary.bin").write_bytes(b"\x00\x01valid utf-8 but binary")  # NUL at the start: skipped
    (root / "empty.txt").write_text("")
    (root / ".hidden.txt").write_text("hidden file\n")
    (root / ".git").mkdir()
    (root / ".git" / "config.txt").write_text("hidden folder\n")
    (root / "sub" / "__pycache__").mkdir()
    (root / "sub" / "__pycache__" / "cached.txt").write_text("cache\n")
    return root


LISTED = ["binary.bin", "empty.txt", "latin1.txt", "sub-x.txt", "sub/b-late-nul.txt", "sub/deeper/deep.txt",
          "sub/nested.py", "top.txt"]
TEXTS = {"empty.txt", "sub/b-late-nul.txt", "sub/deeper/deep.txt", "sub/nested.py", "sub-x.txt", "top.txt"}


def _rel(root, files):
    return [f.relative_to(root).as_posix() for f in files]


def test_listing_skips_hidden_and_cache_and_sorts_by_relative_posix_path(folder):
    assert _rel(folder, list_files(folder)) == LISTED
    assert _rel(folder, list_files(folder, ["**/*"])) == LISTED


def test_a_pattern_matches_at_any_depth(folder):
    assert _rel(folder, list_files(folder, "*.txt")) == _rel(folder, list_files(folder, "**/*.txt")) == [
        "empty.txt", "latin1.txt", "sub-x.txt", "sub/b-late-nul.txt", "sub/deeper/deep.txt", "top.txt"]
    assert _rel(folder, list_files(folder, ["deeper/*.txt", "*.py"])) == ["sub/deeper/deep.txt", "sub/nested.py"]
    assert _rel(folder, list_files(folder, "sub/*")) == ["sub/b-late-nul.txt", "sub/nested.py"]
    assert _rel(folder, list_files(folder, "*", exclude=["deep*", "*.bin"])) == [
        f for f in LISTED if "deep" not in f and f != "binary.bin"]


def test_a_file_is_itself_and_a_missing_path_is_an_error(folder):
    assert list_files(folder / ".hidden.txt", "*.py") == [folder / ".hidden.txt"]  # named, so read
    with pytest.raises(ConfigError, match="is neither a file nor a folder"):
        list_files(folder / "missing")
    with pytest.raises(ConfigError, match="relative to the folder"):
        list_files(folder, "/abs/*.txt")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinked_folders_are_not_entered(folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.txt").write_text("outside\n")
    (folder / "link").symlink_to(outside, target_is_directory=True)
    assert _rel(folder, list_files(folder)) == LISTED


def test_reading_one_rule_for_binary_and_encoding(folder):
    assert read_text_file(folder / "top.txt") == "top\n"
    assert read_text_file(folder / "binary.bin") is None  # NUL in the first 8 KiB (though valid UTF-8)
    assert read_text_file(folder / "latin1.txt") is None  # not UTF-8
    assert read_text_file(folder / "sub" / "b-late-nul.txt") == LATE_NUL.decode()  # NUL only after 8 KiB
    assert read_text_file(folder / "empty.txt") == ""


class _ByteTokenizer:
    """A tokenizer of UTF-8 bytes: all compression_report needs."""

    def __len__(self):
        return 256

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}


def test_training_and_evaluation_see_the_same_files_and_texts(folder):
    expected = {name: read_text_file(folder / name) for name in sorted(TEXTS)}
    skipped = []
    training = {d.key: d.payload for d in _text_documents(folder, ["**/*"], lambda: skipped.append(1))}
    # training drops the empty file as nothing to learn from; the rest is the same text
    assert training == {k: v for k, v in expected.items() if v}
    assert len(skipped) == 3  # binary, latin-1, empty
    # `eval compression` with its default pattern "*" and training's "**/*" read the same files and bytes
    for pattern in ("*", "**/*"):
        row = compression_report([folder], _ByteTokenizer(), LZWCodec(256, 64, 4), window=64, pattern=pattern,
                                 progress=False)[0]
        assert row.files == len(expected)
        assert row.bytes == row.tokens == sum(len(t.encode()) for t in expected.values())
    # `eval bpb` domains: the same files, in the same order, minus blank ones
    assert _texts(_domains([f"d={folder}"], None, [])["d"], None, None) == [t for t in expected.values() if t]
