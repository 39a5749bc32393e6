"""Speculative hypertoken decoding (prompt lookup): drafts read ahead in one forward equal reading them one
by one, greedy output equals plain greedy output, and the sampling rule keeps the distribution."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervocab.errors import ConfigError, InputTypeError, InvalidCodeError, StateError
from hypervocab.speculative import PromptLookup, accept_draft

transformers = pytest.importorskip("transformers")

from .models import V  # noqa: E402

PROMPT = ("def area(width, height):\n    return width * height\n\n\n"
          "def perimeter(width, height):\n    return 2 * (width + height)\n\n\n"
          "def area(width, height):\n    return width * height\n\n\n")


def draw_codes(data, decoder, n: int) -> list[int]:
    """``n`` codes valid one after another from ``decoder``'s state: base ids, entries, and the legal new id
    (often, so that drafts define hypertokens and use them at once)."""
    dec, out = decoder.copy(), []
    for _ in range(n):
        kinds = ["base"] + (["entry"] if len(dec) else []) + (["new", "new"] if dec.next_phrase else [])
        kind = data.draw(st.sampled_from(kinds))
        if kind == "base":
            c = data.draw(st.integers(0, 60))
        elif kind == "entry":
            c = V + data.draw(st.integers(0, len(dec) - 1))
        else:
            c = dec.next_id
        dec.push(c)
        out.append(c)
    return out


def prompt_session(tiny_model, tiny_htok, text: str = PROMPT):
    codes = tiny_htok(text, return_tensors="np")["input_ids"]
    session = tiny_model.new_session(1)
    logits, _, _ = session.feed(codes, np.ones_like(codes))
    session.append([int(logits.argmax())])
    return session


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_reading_a_draft_ahead_equals_reading_it_code_by_code(tiny_model, tiny_htok, data):
    ahead, stepped = prompt_session(tiny_model, tiny_htok), prompt_session(tiny_model, tiny_htok)
    draft = draw_codes(data, ahead.decoders[0], data.draw(st.integers(1, 7)))
    count, cand = ahead.count.copy(), ahead.cand.clone()
    with torch.no_grad():
        got = ahead.read_ahead(draft)
        want = [stepped.advance()[0]]
        for c in draft:
            want.append(stepped.step([c])[1][0])
    want = torch.stack(want)
    assert got.shape == want.shape == (len(draft) + 1, V + 64)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))  # the same ids are visible at every position
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-5, rtol=0)
    # only the appended code counts as read: the draft's entries are not installed yet
    assert np.array_equal(ahead.count, count) and torch.equal(ahead.cand, cand)
    assert len(ahead.books[0]) == len(ahead.decoders[0]) == int(count[0])
    assert [c for c, _ in ahead.ahead] == draft


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_accepting_part_of_a_draft_then_leaving_it_equals_stepping(tiny_model, tiny_htok, data):
    ahead, stepped = prompt_session(tiny_model, tiny_htok), prompt_session(tiny_model, tiny_htok)
    draft = draw_codes(data, ahead.decoders[0], data.draw(st.integers(2, 6)))
    n = data.draw(st.integers(0, len(draft) - 1))
    with torch.no_grad():
        ahead.read_ahead(draft)
        for c in draft[:n]:
            ahead.append([c])
            ahead.accept_ahead()
        other = draw_codes(data, ahead.decoders[0], 1)[0]  # maybe the draft's own code: it is read again
        ahead.append([other])
        ahead.drop_ahead()
        got = ahead.advance()[0]
        stepped.advance()
        for c in draft[:n]:
            stepped.step([c])
        want = stepped.step([other])[1][0]
    assert ahead.cache.get_seq_length() == stepped.cache.get_seq_length() == ahead.mask.shape[1]
    assert np.array_equal(ahead.base_len, stepped.base_len) and np.array_equal(ahead.code_len, stepped.code_len)
    assert ahead.books == stepped.books and ahead.tokens == stepped.tokens
    # the tables too: a draft's entries leave no length behind (it would bar the legal next id from a budget)
    w = min(ahead.lengths.shape[1], stepped.lengths.shape[1])
    assert torch.equal(ahead.lengths[:, :w], stepped.lengths[:, :w]) and not ahead.lengths[:, w:].any()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.allclose(got[finite], want[finite], atol=1e-5, rtol=0)


def same_greedy(got, want) -> bool:
    """Whether two greedy runs wrote the same codes; where they part, the two codes must tie (within float
    rounding) in the plain run's scores, as they do where a random model scores two entries alike."""
    a, b = got.new_codes[0], want.new_codes[0]
    if a == b:
        return True
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    scores = want.logits[i][0]  # logits[0] is after reading the prompt: code i was chosen from logits[i]
    assert abs(float(scores[a[i]] - scores[b[i]])) <= 1e-5, f"part at {i}: {a[i]} vs {b[i]}, not a tie"
    for x, y in zip(got.logits[:i + 1], want.logits[:i + 1]):
        assert torch.allclose(x[torch.isfinite(x)], y[torch.isfinite(y)], atol=1e-5, rtol=0)
    return False


@pytest.mark.parametrize("k", [3])
def test_greedy_with_prompt_lookup_is_greedy(tiny_model, tiny_htok, stdlib_files, k):
    texts = [PROMPT] + [path.read_text(encoding="utf-8")[:400] for path in stdlib_files[:3]]
    accepted, identical = 0, 0
    for text in texts:
        codes = tiny_htok(text, return_tensors="pt")["input_ids"]
        kw = dict(max_new_tokens=30, eos_token_id=[], return_dict_in_generate=True, output_logits=True,
                  output_codebooks=True)
        want = tiny_model.generate(codes, **kw)
        got = tiny_model.generate(codes, prompt_lookup_num_tokens=k, **kw)
        st_ = got.stats[0]
        assert 0 <= st_.accepted_codes <= st_.draft_codes and want.stats[0].draft_codes == 0
        accepted += st_.accepted_codes
        if not same_greedy(got, want):
            continue
        identical += 1
        assert got.new_base_ids == want.new_base_ids and got.codebooks == want.codebooks
        assert len(got.logits) == len(want.logits)
        for a, b in zip(got.logits, want.logits):
            assert torch.equal(torch.isfinite(a), torch.isfinite(b))
            assert torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], atol=1e-5, rtol=0)
        # the state left behind continues exactly like plain greedy's
        more = tiny_htok.encode_continuation("\n# more\n", got)
        a = tiny_model.generate(**more, past=got, max_new_tokens=5, eos_token_id=[])
        b = tiny_model.generate(**more, past=want, max_new_tokens=5, eos_token_id=[])
        assert torch.equal(a, b)
    assert identical >= len(texts) - 1  # ties are rare: this compares, it does not excuse
    assert accepted > 0  # some drafts were right: the look-ahead path really ran


def test_stopping_inside_an_accepted_draft_stops_where_greedy_stops(tiny_model, tiny_htok, stdlib_files):
    compared = 0
    for text in [PROMPT] + [path.read_text(encoding="utf-8")[:400] for path in stdlib_files[:3]]:
        codes = tiny_htok(text, return_tensors="pt")["input_ids"]
        kw = dict(max_new_tokens=30, return_dict_in_generate=True, output_logits=True)
        plain = tiny_model.generate(codes, eos_token_id=[], **kw)
        base_ids = [c for c in plain.new_codes[0][3:] if c < V]
        if not base_ids:
            continue
        # an id greedy writes after a few steps: as eos it must end the sequence at its first use
        want = tiny_model.generate(codes, eos_token_id=[base_ids[0]], **kw)
        got = tiny_model.generate(codes, eos_token_id=[base_ids[0]], prompt_lookup_num_tokens=6, **kw)
        if same_greedy(got, want):
            assert got.stats[0].finish_reason == want.stats[0].finish_reason == "eos"
            compared += 1
        want = tiny_model.generate(codes, max_new_base_tokens=9, eos_token_id=[], **kw)
        got = tiny_model.generate(codes, max_new_base_tokens=9, eos_token_id=[], prompt_lookup_num_tokens=6, **kw)
        if same_greedy(got, want):
            assert len(got.new_base_ids[0]) <= 9 and got.stats[0].finish_reason == want.stats[0].finish_reason
            compared += 1
    assert compared >= 4


def test_greedy_with_prompt_lookup_under_a_base_budget_is_greedy(tiny_model, tiny_htok):
    """A draft that was read and dropped must not change what the budget allows next (a regression: the
    draft's entry lengths stayed in the table and barred the legal next id once the budget got short)."""
    codes = tiny_htok("import os\nimport sys\nimport os\nimport sys\n", return_tensors="pt")["input_ids"]
    for budget in range(1, 13):
        kw = dict(max_new_tokens=budget, max_new_base_tokens=budget, eos_token_id=[], return_dict_in_generate=True)
        want = tiny_model.generate(codes, **kw)
        got = tiny_model.generate(codes, prompt_lookup_num_tokens=4, **kw)
        assert got.new_codes == want.new_codes, budget


def test_sampling_with_prompt_lookup_is_valid_and_reproducible(tiny_model, tiny_htok):
    codes = tiny_htok(PROMPT, return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=25, do_sample=True, top_k=20, eos_token_id=[], return_dict_in_generate=True,
              prompt_lookup_num_tokens=5)
    a = tiny_model.generate(codes, seed=3, **kw)
    b = tiny_model.generate(codes, seed=3, **kw)
    assert a.new_codes == b.new_codes
    decoder = tiny_model.codec.decoder_state()
    decoder.push(codes[0].numpy())
    assert decoder.push(np.array(a.new_codes[0])).ids.tolist() == a.new_base_ids[0]  # every code was valid


def test_the_acceptance_rule_keeps_the_distribution():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for draft in (0, 3):
        counts = np.bincount([accept_draft(probs, draft, gen) for _ in range(n)], minlength=5) / n
        sigma = np.sqrt(probs.numpy() * (1 - probs.numpy()) / n)
        assert (np.abs(counts - probs.numpy()) < 5 * sigma).all(), (draft, counts)
    certain = torch.tensor([0.0, 1.0, 0.0])
    assert {accept_draft(certain, 1, gen) for _ in range(50)} == {1}
    assert 1 not in {accept_draft(torch.tensor([0.5, 0.0, 0.5]), 1, gen) for _ in range(200)}
    with pytest.raises(InputTypeError, match=re.escape("draft must be an int in [0, 2], got 3")):
        accept_draft(torch.tensor([0.5, 0.0, 0.5]), 3)
    with pytest.raises(InputTypeError, match=re.escape("probs must be a 1-D torch.Tensor, got Tensor of shape (1, 3)")):
        accept_draft(torch.tensor([[0.5, 0.0, 0.5]]), 0)


def read_tokens(tiny_model, tokens: list[int]):
    codes = tiny_model.codec.encode(tokens)[None]
    session = tiny_model.new_session(1)
    with torch.no_grad():
        session.feed(codes, np.ones_like(codes))
    return session


def test_prompt_lookup_drafts_the_codes_that_followed_the_last_codes_before(tiny_model):
    a, b, d, x = 1300, 1301, 1303, 1320  # ordinary text tokens (low ids are special tokens: never merged)
    session = read_tokens(tiny_model, [a, b, 1302, d, x, a, b, d, a, b])
    codes = session.history[0]
    assert codes == [a, b, 1302, d, x, V, d, V]  # "a b" is entry V, used twice
    lookup = PromptLookup(tiny_model.codec, 4, max_ngram=2)
    # "d (a b)" never occurred before, "(a b)" did at 5: the codes that followed it are the draft, as written
    assert lookup.for_session(session, limit=10) == [d, V]
    assert lookup.for_session(session, limit=1) == [d]
    assert lookup.for_session(session, limit=0) == []


def test_prompt_lookup_falls_back_to_tokens_encoded_with_the_live_codebook(tiny_model):
    a, b, c, d, x = 1300, 1301, 1302, 1303, 1320
    session = read_tokens(tiny_model, [a, b, c, d, x, c, d])
    codes = session.history[0]
    assert codes[-1] >= V and codes.count(codes[-1]) == 1  # "c d" is a hypertoken used once: no code matches
    lookup = PromptLookup(tiny_model.codec, 4, max_ngram=3)
    draft = lookup.for_session(session, limit=10)
    # the tokens "c d" occurred at 2..3, followed by "x c d": written with the live codebook ("x c" is an entry)
    assert draft == tiny_model.codec.encode_continuation([x, c, d], session.decoders[0])
    assert session.decoders[0].copy().push(np.array(draft)).ids.tolist() == [x, c, d]
    assert len(draft) == 2 and draft[0] >= V
    assert lookup.for_session(read_tokens(tiny_model, [a, b, c]), limit=5) == []  # nothing occurred before


def test_prompt_lookup_bad_options_name_the_argument(tiny_model, tiny_htok):
    codes = tiny_htok(PROMPT, return_tensors="pt")["input_ids"]
    with pytest.raises(ConfigError, match=re.escape("prompt_lookup_num_tokens must be an int >= 1 or None, got 0")):
        tiny_model.generate(codes, prompt_lookup_num_tokens=0)
    with pytest.raises(ConfigError, match=re.escape("max_matching_ngram_size must be an int >= 1 or None, got 'x'")):
        tiny_model.generate(codes, prompt_lookup_num_tokens=2, max_matching_ngram_size="x")
    with pytest.raises(ConfigError, match="prompt_lookup_num_tokens drafts for one sequence: input_ids has 2 rows"):
        tiny_model.generate(torch.cat([codes, codes]), prompt_lookup_num_tokens=2)


def test_the_proposer_is_a_pure_function_over_arrays():
    """ngram_follow's docstring examples hold, and the proposer drafts from plain lists (no session needed)."""
    import doctest

    from hypervocab import LZWCodec, speculative

    assert doctest.testmod(speculative).failed == 0
    codec = LZWCodec(V, 64, 4)
    codes = codec.encode([5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6])
    state = codec.decoder_state()
    tokens = state.push(codes).ids.tolist()
    book = state.codebook
    entries = [book.phrase(i) for i in book.ids]
    draft = PromptLookup(codec, 3)(codes.tolist(), tokens, state, entries, 3)
    assert draft and state.copy().push(np.array(draft)).ids.tolist()[:2] == [7, 8]  # what followed "5 6" before


def test_read_ahead_rejects_a_bad_draft_and_keeps_the_session(tiny_model, tiny_htok):
    session = prompt_session(tiny_model, tiny_htok)
    before = (session.decoders[0].copy(), list(session.books[0]), session.mask.shape[1])
    bad = V + 63  # no such entry yet
    with pytest.raises(InvalidCodeError, match=re.escape("draft[1]: ")):
        session.read_ahead([5, bad])
    assert session.decoders[0].codebook == before[0].codebook and session.books[0] == before[1]
    assert session.mask.shape[1] == before[2] and not session.ahead
    with torch.no_grad():
        session.read_ahead([5, 6])
        with pytest.raises(StateError, match="drafts read ahead are pending"):
            session.read_ahead([5])
        session.append([7])
        with pytest.raises(StateError, match="accept_ahead\\(\\) needs the next draft code appended"):
            session.accept_ahead()
        session.drop_ahead()
        assert session.advance().shape == (1, V + 64)


def test_protocol_misuse_is_a_state_error_not_a_type_error(tiny_model, tiny_htok):
    """Calls out of order raise StateError (a ValueError): the arguments were fine, the state was not."""
    from hypervocab import HyperSession

    assert issubclass(StateError, ValueError) and not issubclass(StateError, TypeError)
    session = prompt_session(tiny_model, tiny_htok)
    with torch.no_grad():
        logits = session.advance()
        with pytest.raises(StateError, match=re.escape("advance() reads one appended code per row: append exactly "
                                                       "one first")):
            session.advance()  # nothing appended since
        session.append([int(logits.argmax())])
        session.read_ahead([5, 6])
        with pytest.raises(StateError, match=re.escape("drafts read ahead are pending: drop_ahead() before joining "
                                                       "sessions")):
            HyperSession.concat([session, prompt_session(tiny_model, tiny_htok)])
        session.drop_ahead()


def test_an_invalid_code_in_a_later_row_leaves_every_row_as_it_was(tiny_model, tiny_htok):
    """A batch is pushed all or nothing: the rows before the bad one give back their entries and tokens."""
    good = tiny_htok(PROMPT, return_tensors="np")["input_ids"][:, :12]
    bad = good.copy()
    bad[0, 5] = V + 63  # not an entry yet
    session = tiny_model.new_session(2)
    with pytest.raises(InvalidCodeError, match=re.escape("input_ids[1][5]: ")):
        session.feed(np.concatenate([good, bad]), np.ones((2, 12), np.int64))
    assert session.books == [[], []] and session.tokens == [[], []] and session.history == [[], []]
    assert [len(d) for d in session.decoders] == [0, 0]
    with torch.no_grad():  # and the session still works
        logits, _, _ = session.feed(np.concatenate([good, good]), np.ones((2, 12), np.int64))
    assert torch.equal(logits[0], logits[1]) and len(session.books[0]) == len(session.decoders[0]) > 0
