"""HyperTokenizer on tokenizers nobody here tuned for: Mistral's v3 and Tekken (transformers' MistralCommonBackend),
from the real tokenizer files the mistral-common package ships; and render() in linear time."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

from hypervocab import HyperConfig, HyperTokenizer

mistral_common = pytest.importorskip("mistral_common")
transformers = pytest.importorskip("transformers")

DATA = Path(mistral_common.__file__).parent / "data"
CODE = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_text(encoding="utf-8")[:3000]


@pytest.fixture(scope="module", params=[("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
                                        ("tekken_240718.json", "tekken.json")], ids=["v3", "tekken"])
def mistral(request, tmp_path_factory):
    src, name = request.param
    folder = tmp_path_factory.mktemp(name.replace(".", "-"))
    shutil.copyfile(DATA / src, folder / name)  # the backend reads a folder holding one tokenizer file
    return transformers.MistralCommonBackend.from_pretrained(str(folder))


def test_mistral_backends_bind_encode_and_decode(mistral):
    """added_tokens_decoder is a method there (and raises): the control tokens still come out disabled."""
    htok = HyperTokenizer.from_base(mistral, HyperConfig(max_codebook_size=256))
    assert set(mistral.all_special_ids) <= set(htok.config.disabled_ids)
    digits = [i for i in mistral.encode("year 2024: 31 items", add_special_tokens=False)
              if any(ch.isdecimal() for ch in mistral.decode([i]))]
    assert digits and set(digits) <= set(htok.config.disabled_ids)
    enc = htok(CODE)
    base = mistral.encode(CODE)
    assert len(enc["input_ids"]) < 0.9 * len(base)  # real code compresses
    assert htok.codec.decode(enc["input_ids"]).tolist() == base
    assert htok.decode(enc["input_ids"]) == mistral.decode(base)


def test_render_reads_each_token_a_bounded_number_of_times(smollm2_tokenizer):
    """The text of each code comes from an incremental detokenizer: the ids decoded in all grow linearly."""
    htok = HyperTokenizer.from_base(smollm2_tokenizer, HyperConfig(max_codebook_size=1024))
    decoded = []
    real = smollm2_tokenizer.decode

    class Counting:  # the real tokenizer, with its decode calls counted
        def __getattr__(self, name):
            return getattr(smollm2_tokenizer, name)

        def decode(self, ids, **kw):
            decoded.append(len(ids))
            return real(ids, **kw)

    counted = HyperTokenizer(Counting(), htok.config)
    for repeat in (1, 8):
        decoded.clear()
        codes = htok(CODE * repeat)["input_ids"]
        out = counted.render(codes, format="html")
        n = len(htok.codec.decode(codes))
        assert sum(decoded) <= 8 * n + 64, (repeat, n, sum(decoded))
        assert out.startswith('<pre class="hypervocab">') and "hypertoken" in out
    plain = counted.render(codes).replace("\x1b[0m", "")
    for colour in range(31, 37):
        plain = plain.replace(f"\x1b[{colour}m", "")
    assert plain == smollm2_tokenizer.decode(htok.codec.decode(codes).tolist())
