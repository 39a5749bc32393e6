"""recipes/smollm2-135m/corpus.py: the held-out filter, pack -> build round trip, determinism, the yaml list.

Everything runs on small fixture folders of real text (standard-library sources and docstrings): no network,
no downloads, no tokenizer.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus():
    name = "smollm2_corpus_recipe"
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / "smollm2-135m" / "corpus.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and the worker processes look the module up by name
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(name, None)


def _source(module) -> str:
    return inspect.getsource(module)


def _heldout_text() -> str:
    import json.decoder

    return _source(json.decoder)


def _keys(corpus, *texts: str) -> frozenset[int]:
    return frozenset(corpus.line_key(line) for t in texts for line in corpus.nontrivial_lines(t))


def test_heldout_filter_drops_overlap_and_keeps_other_text(corpus):
    held = _heldout_text()
    keys = _keys(corpus, held)
    lines = held.splitlines()
    # a vendored copy with a new header and part of the module: still mostly held-out lines
    copy = "# vendored from the standard library\n" + "\n".join(lines[: len(lines) * 2 // 3]) + "\n"
    assert corpus.overlap(copy, keys) > 0.9
    assert corpus.check(copy, "python", keys) == "heldout"
    other = _source(textwrap)
    assert corpus.overlap(other, keys) < 0.05
    assert corpus.check(other, "python", keys) is None
    # a few shared lines are not enough
    mixed = other + "\n".join(lines[:10]) + "\n"
    assert corpus.check(mixed, "python", keys) is None


def test_po_overlap_counts_translations_only(corpus):
    msgid = 'msgid "The quick brown fox jumps over the lazy dog"\n'
    held_po = msgid + 'msgstr "Le vif renard brun saute par-dessus le chien"\n'
    keys = _keys(corpus, held_po)
    same_msgid = (msgid + 'msgstr "Der schnelle braune Fuchs springt ueber den Hund"\n') * 3
    assert corpus.overlap(same_msgid, keys, po=True) == 0.0
    assert corpus.overlap(held_po * 3, keys, po=True) == 1.0


def test_heldout_hashes_round_trip(corpus, tmp_path):
    keys = _keys(corpus, _heldout_text())
    corpus.save_heldout(tmp_path / "h.bin", keys)
    assert corpus.load_heldout(tmp_path / "h.bin") == keys
    assert (tmp_path / "h.bin").stat().st_size == 8 * len(keys)


def test_domains_and_fixture_rules(corpus):
    d = corpus.domain_of
    assert d("torch/nn/modules/linear.py") == "python"
    assert d("torch/include/ATen/Tensor.h") == "cpp"
    assert d("nvidia/cu13/include/cuda_runtime.h") == "cpp"
    assert d("cmake/data/share/cmake-4.4/Modules/FindCUDA.cmake") == "code"
    assert d("pkg/CMakeLists.txt") == "code"
    assert d("statsmodels/datasets/anes96/anes96.csv") == "csv"
    assert d("pandas/tests/io/data/csv/test1.csv") is None  # a test fixture
    assert d("pandas/tests/io/test_csv.py") == "python"  # test code is code
    assert d("numpy-2.5.2.dist-info/METADATA") == "docs"
    assert d("numpy-2.5.2.dist-info/RECORD") is None
    assert d("onnx/onnx_ml_pb2.py") is None  # generated
    assert d("pkg/LICENSE.txt") is None


def test_html_text(corpus):
    html = ('<html><head><title>T</title></head><body><div id="banner"><a>Download the ebook</a></div>'
            '<ul class="docnav top"><li>Previous</li></ul><div class="para">First  paragraph,\n  wrapped.</div>'
            '<pre>x = 1\n  y = 2</pre><p>Caf&eacute; &amp; more</p></body></html>')
    text = corpus.html_text(html)
    assert "Download" not in text and "Previous" not in text
    assert "First paragraph, wrapped." in text
    assert "x = 1\n  y = 2" in text
    assert "Café & more" in text


def _fixture(tmp_path: Path, corpus):
    """A site-packages-like tree, pack sources, and the held-out line set."""
    import json.encoder
    import string

    held = _heldout_text()
    site = tmp_path / "site"
    files = {
        "pkg/__init__.py": _source(textwrap),
        "pkg/strings.py": _source(string),
        "pkg/copy_of_strings.py": _source(string),  # exact duplicate: dropped
        "pkg/vendored_decoder.py": held,  # held-out text: dropped
        "pkg/encoder.py": _source(json.encoder),
        "pkg/include/pkg.h": "/* A header. */\n#ifndef PKG_H\n#define PKG_H\nint pkg_answer(void);\n"
                             "static inline int pkg_twice(int x) { return 2 * x; }\n#endif  /* PKG_H */\n",
        "pkg/data/table.csv": "name,value,unit\n" + "".join(f"row{i},{i * 3},metres\n" for i in range(40)),
        "pkg/tests/data/fixture.json": json.dumps({"a": list(range(50))}, indent=1),  # fixture: skipped
        "pkg/conf.yaml": "settings:\n  name: example configuration\n  values: [1, 2, 3]\n  enabled: true\n",
        "pkg/README.md": "# pkg\n\n" + (textwrap.TextWrapper.__doc__ or ""),
        "pkg/big.py": "x = 1\n" * 50000,  # over 256 KB: skipped
    }
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (site / "pkg" / "blob.py").write_bytes(b"\x89PNG\0\0binary")
    info = site / "pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.4\nName: pkg\nVersion: 1.0\nLicense-Expression: MIT\n\n"
                                   "A package made for a test, with a description long enough to keep.\n")
    (info / "RECORD").write_text("pkg/__init__.py,,\npkg-1.0.dist-info/METADATA,,\n")

    prose = tmp_path / "prose"
    import collections
    import functools
    import json as json_mod

    for mod in (collections, functools, json_mod, inspect):
        (prose / f"{mod.__name__}.rst.txt").parent.mkdir(parents=True, exist_ok=True)
        (prose / f"{mod.__name__}.rst.txt").write_text(mod.__doc__ or "")
    po = ('msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n\n'
          'msgid "Save and continue editing"\nmsgstr "Sichern und weiter bearbeiten"\n\n'
          'msgid "Are you sure you want to delete this?"\nmsgstr "Wollen Sie das wirklich loeschen?"\n')
    chat = "".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                            {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                   for i in range(5))
    S = corpus.Source
    sources = [
        S("prose", "docs", 1, corpus.file_docs(prose, ["*.rst.txt"], skip=lambda rel: rel == "inspect.rst.txt"),
          "PSF-2.0", "fixture"),
        S("catalogue", "po", 1, lambda: iter([("de/LC_MESSAGES/x.po", po)]), "BSD-3-Clause", "fixture"),
        S("talk", "chat", 1, lambda: iter([("en/talk.jsonl", chat)]), "BSD-3-Clause", "fixture"),
        S("heldcopy", "docs", 2, lambda: iter([("copy.txt", held)]), "PSF-2.0", "fixture"),
        S("more-prose", "intl", 2, lambda: iter([("fr.txt", "Bonjour à tous. " * 20)]), "GPL-2+", "fixture"),
    ]
    return site, sources, _keys(corpus, held), files


def _read_jsonl(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()]


def test_pack_build_round_trip(corpus, tmp_path, capsys):
    site, sources, keys, files = _fixture(tmp_path, corpus)
    pack = tmp_path / "pack"
    manifest = corpus.write_pack(pack, sources, keys, max_mb=1, parts=2, preset=1)
    assert sorted(p.name for p in pack.iterdir()) == ["heldout-lines.bin", "manifest.json", "part-1.tar.xz",
                                                     "part-2.tar.xz"]
    assert all(p["bytes"] <= 500_000 for p in manifest["parts"].values())
    part2 = {s["name"]: s for s in manifest["parts"]["part-2.tar.xz"]["sources"]}
    assert part2["heldcopy"]["documents"] == 0 and part2["heldcopy"]["skipped"] == {"heldout": 1}

    out = tmp_path / "corpus"
    summary = corpus.build(out, pack=pack, source=None, roots=[(site, None)], workers=2, tokenizer="none")
    py = {r["path"]: r["text"] for r in _read_jsonl(out / "python")}
    assert py["pkg/__init__.py"] == files["pkg/__init__.py"]
    assert py["pkg/encoder.py"] == files["pkg/encoder.py"]
    assert len([p for p in py if p.endswith("strings.py")]) == 1  # the duplicate went
    assert "pkg/vendored_decoder.py" not in py and "pkg/big.py" not in py and "pkg/blob.py" not in py
    assert [r["path"] for r in _read_jsonl(out / "cpp")] == ["pkg/include/pkg.h"]
    assert [r["path"] for r in _read_jsonl(out / "csv")] == ["pkg/data/table.csv"]
    assert [r["path"] for r in _read_jsonl(out / "yaml")] == ["pkg/conf.yaml"]
    assert not (out / "json").exists()  # the only JSON was a test fixture
    docs = {r["path"] for r in _read_jsonl(out / "docs")}
    assert {"pkg/README.md", "pkg-1.0.dist-info/METADATA", "docs/prose/collections.rst.txt"} <= docs
    assert "docs/prose/inspect.rst.txt" not in docs  # the source's own skip rule (like a held-out path)
    assert _read_jsonl(out / "po")[0]["text"].count("msgstr") == 3
    chat = _read_jsonl(out / "chat")
    answers = sorted(c["messages"][1]["content"] for c in chat)
    assert answers == [f"Answer {i}." for i in range(5)] and chat[0]["messages"][0]["role"] == "user"
    assert [r["path"] for r in _read_jsonl(out / "intl")] == ["intl/more-prose/fr.txt"]
    assert summary["domains"]["python"]["skipped"] == {"binary": 1, "duplicate": 1, "heldout": 1, "huge": 1}
    assert summary["domains"]["python"]["tokens"] > 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "MIT (pkg==1.0)" in json.dumps(summary["domains"]["python"]["sources"])


def test_deterministic_and_incremental(corpus, tmp_path, capsys):
    site, sources, keys, _ = _fixture(tmp_path, corpus)
    a, b = tmp_path / "pack-a", tmp_path / "pack-b"
    corpus.write_pack(a, sources, keys, max_mb=1, parts=2, preset=1)
    corpus.write_pack(b, sources, keys, max_mb=1, parts=2, preset=1)
    for name in ("part-1.tar.xz", "part-2.tar.xz", "heldout-lines.bin", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    full = tmp_path / "full"
    corpus.build(full, pack=a, source=None, roots=[(site, None)], workers=2, tokenizer="none")
    # part 2 not there yet: it is skipped with a message, then a second run adds it without redoing the rest
    (a / "part-2.tar.xz").rename(tmp_path / "part-2.tar.xz")
    inc = tmp_path / "inc"
    corpus.build(inc, pack=a, source=None, roots=[(site, None)], workers=1, tokenizer="none")
    assert "part-2.tar.xz is not there" in capsys.readouterr().err
    assert not list(inc.glob("*/part-2-*.jsonl"))
    (tmp_path / "part-2.tar.xz").rename(a / "part-2.tar.xz")
    corpus.build(inc, pack=a, source=None, roots=[(site, None)], workers=1, tokenizer="none")
    err = capsys.readouterr().err
    assert "tree: already built" in err and "part-1: already built" in err
    files = sorted(p.relative_to(full).as_posix() for p in full.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(inc).as_posix() for p in inc.rglob("*.jsonl"))
    for rel in files:
        assert (full / rel).read_bytes() == (inc / rel).read_bytes(), rel
    assert (full / "summary.json").read_text() == (inc / "summary.json").read_text()


def test_budget_per_domain(corpus, tmp_path):
    site, sources, keys, _ = _fixture(tmp_path, corpus)
    out = tmp_path / "small"
    corpus.save_heldout(tmp_path / "h.bin", keys)
    summary = corpus.build(out, roots=[(site, None)], workers=1, tokenizer="none", budget_mb=0.001,
                           heldout=tmp_path / "h.bin")
    assert summary["domains"]["python"]["documents"] == 1  # the first document reaches the budget


def test_yaml_lists_existing_paths(corpus, tmp_path, capsys):
    from hypervocab.training.config import DataSource

    site, sources, keys, _ = _fixture(tmp_path, corpus)
    corpus.write_pack(tmp_path / "pack", sources, keys, max_mb=1, parts=2, preset=1)
    out = tmp_path / "corpus"
    corpus.build(out, pack=tmp_path / "pack", source=None, roots=[(site, None)], workers=1, tokenizer="none")
    capsys.readouterr()
    corpus.main(["yaml", "--out", str(out), "--train-tokens", "1e5"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert {Path(d["path"]).name for d in data} == {"python", "cpp", "docs", "intl", "yaml", "csv", "po", "chat"}
    assert abs(sum(d["weight"] for d in data) - 1) < 1e-3
    for d in data:
        assert Path(d["path"]).is_dir()
        assert DataSource(**d).problems("d") == []
        assert d["kind"] == ("chat" if d["path"].endswith("chat") else "jsonl")


def test_roff_text(corpus):
    src = ('.\\" a comment\n.TH LS 1 "2022"\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n.PP\n'
           'List information about the FILEs (\\fB\\-a\\fP, \\fB\\-\\-all\\fR) \\(em sorted.\n.TP\n'
           '\\fB\\-\\-block\\-size\\fP=\\fI\\,SIZE\\/\\fP\nscale sizes\n.BR ls (1)\n')
    text = corpus.roff_text(src)
    assert text == ("NAME\nls - list directory contents\n\nDESCRIPTION\n\nList information about the FILEs "
                    "(-a, --all) \u2014 sorted.\n\n--block-size=SIZE\nscale sizes\nls(1)\n")
