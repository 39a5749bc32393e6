"""Continuous batching: requests join and leave one running batch, and each writes what it writes alone."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervocab.errors import ConfigError, InputTypeError, StateError
from hypervocab.serving.batch import Finished, Job, Piece, RunningBatch, request_options
from hypervocab.serving.engine import Engine
from hypervocab.session import HyperSession

from .models import make

TEXTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\n",
    "The cat sat on the mat. The cat sat on the mat. The",
    "import os\nimport sys\nimport os\nimport sys\n",
    "Dear team, thank you for your work on the release. Dear team,",
]


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    return make("llama", smollm2_tokenizer)


class Out:
    """What one job received: its text pieces and its end."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.end: Finished | None = None
        self.done = threading.Event()

    def __call__(self, ev: Piece | Finished) -> None:
        if isinstance(ev, Piece):
            self.pieces.append(ev)
        else:
            self.end = ev
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    def summary(self) -> tuple:
        e = self.end
        return (self.text, e.finish_reason, e.prompt_tokens, e.prompt_codes, e.completion_tokens, e.completion_codes,
                e.hypertokens)


def job(tok, text: str, max_tokens: int, **kw) -> tuple[Job, Out]:
    out = Out()
    return Job(tok(text)["input_ids"], request_options(max_tokens=max_tokens, **{"temperature": 0.0, **kw}), out), out


def drive(batch: RunningBatch, schedule: list[tuple[int, Job]], max_steps: int = 500) -> list[int]:
    """Join each job at its step and step until every job has ended; the batch size at each step."""
    sizes, step, pending = [], 0, sorted(schedule, key=lambda s: s[0])
    ended = []
    while pending or batch.busy:
        joining = [j for at, j in pending if at <= step]
        pending = [(at, j) for at, j in pending if at > step]
        ended += batch.join(joining)
        if batch.busy:
            ended += batch.step()
            if len(batch):
                sizes.append(len(batch))
        step += 1
        assert step < max_steps
    for j, result in ended:
        j.emit(result)
    return sizes


def alone(model, tok, text: str, max_tokens: int, *, prefill_chunk: int = 64, **kw) -> tuple:
    j, out = job(tok, text, max_tokens, **kw)
    drive(RunningBatch(model, tok, prefill_chunk=prefill_chunk), [(0, j)])
    return out.summary()


def admit(batch: RunningBatch, jobs: list[Job]) -> list:
    """Join ``jobs`` to an empty batch and read their prompts (whole: the batch must read them in one step)."""
    assert not batch.busy and batch.prefill_chunk == 0
    ended = batch.join(jobs)
    ended += batch.step()
    assert not batch.joining
    return ended


def test_requests_joining_at_different_steps_write_what_they_write_alone(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    plan = [(0, TEXTS[0], 30, {}), (0, TEXTS[1], 12, {}), (3, TEXTS[2], 25, {"stop": ["mat"]}),
            (5, TEXTS[3], 40, {}), (20, TEXTS[4], 8, {})]
    want = [alone(model, tok, text, n, **kw) for _, text, n, kw in plan]
    jobs = [(at, *job(tok, text, n, **kw)) for at, text, n, kw in plan]
    sizes = drive(RunningBatch(model, tok), [(at, j) for at, j, _ in jobs])
    assert [out.summary() for _, _, out in jobs] == want
    assert max(sizes) >= 3 and sizes[0] == 2  # they really ran together
    assert sum(w[6] for w in want) > 0  # and hypertokens were written


def test_the_kv_cache_keeps_only_the_columns_someone_reads(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    batch = RunningBatch(model, tok, prefill_chunk=0)
    long_job, _ = job(tok, TEXTS[0] * 3, 3)
    short_job, short = job(tok, TEXTS[2], 20)
    admit(batch, [long_job, short_job])
    width = batch.session.mask.shape[1]
    while len(batch) == 2:
        batch.step()
    # the long prompt's row left: the short row's padding columns went with it
    s = batch.session
    assert s.mask.shape[1] == int(s.code_len[0]) < width and bool(s.mask.all())
    assert s.cache.get_seq_length() == s.mask.shape[1]
    ended = []
    while len(batch):
        ended += batch.step()
    ended[0][0].emit(ended[0][1])
    assert short.summary() == alone(model, tok, TEXTS[2], 20, prefill_chunk=0)


def test_each_row_keeps_its_own_sampling_options_seed_and_logit_bias(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    sampled = dict(temperature=0.9, top_p=0.95, seed=1234)
    banned = tok(" The")["input_ids"][0]  # what the greedy answer repeats
    biased = dict(logit_bias={banned: -100.0})
    want_sampled = alone(model, tok, TEXTS[2], 24, **sampled)
    want_biased = alone(model, tok, TEXTS[2], 24, **biased)
    want_greedy = alone(model, tok, TEXTS[2], 24)
    (a, out_a), (b, out_b), (c, out_c) = (job(tok, TEXTS[2], 24, **kw) for kw in (sampled, biased, {}))
    drive(RunningBatch(model, tok), [(0, a), (1, b), (2, c)])
    assert out_a.summary() == want_sampled  # seeded: the same sample as alone, whatever shares the batch
    assert out_b.summary() == want_biased and out_b.end.hypertokens == 0 and " The" not in out_b.text
    assert out_c.summary() == want_greedy
    assert want_greedy[0] != want_biased[0]  # the bias changed something


def test_a_caller_whose_events_fail_leaves_and_the_others_go_on(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    gone = Job(tok(TEXTS[0])["input_ids"], request_options(max_tokens=30, temperature=0.0),
               lambda ev: (_ for _ in ()).throw(RuntimeError("event loop is closed")))
    b, out_b = job(tok, TEXTS[1], 30)
    batch = RunningBatch(model, tok, prefill_chunk=0)
    ended = admit(batch, [gone, b])
    while len(batch):
        ended += batch.step()
    assert [(j is gone, r.finish_reason) for j, r in ended][0] == (True, "cancelled")
    for j, r in ended:
        if j is b:
            j.emit(r)
    assert out_b.summary() == alone(model, tok, TEXTS[1], 30, prefill_chunk=0)


def test_a_cancelled_request_leaves_and_the_others_go_on(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    batch = RunningBatch(model, tok, prefill_chunk=0)
    (a, out_a), (b, out_b) = job(tok, TEXTS[0], 30), job(tok, TEXTS[1], 30)
    admit(batch, [a, b])
    for _ in range(5):
        batch.step()
    a.cancelled.set()
    ended = batch.step()
    assert [(j is a, r.finish_reason) for j, r in ended] == [(True, "cancelled")]
    assert ended[0][1].completion_codes == 5 and len(batch) == 1
    assert alone(model, tok, TEXTS[0], 30, prefill_chunk=0)[0].startswith(out_a.text)  # what it got was right
    while len(batch):
        ended += batch.step()
    ended[-1][0].emit(ended[-1][1])
    assert out_b.summary() == alone(model, tok, TEXTS[1], 30, prefill_chunk=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.integers(0, 12), st.sampled_from(range(len(TEXTS))), st.integers(1, 24)),
                     min_size=1, max_size=5),
       lookup=st.sampled_from([0, 4]), chunk=st.sampled_from([0, 3, 64]))
def test_any_schedule_of_joins_gives_every_request_its_answer_alone(model, smollm2_tokenizer, plan, lookup, chunk):
    """Property: whatever joins when, with or without prompt lookup while a request is alone, prompts read
    whole or in chunks between the running rows' steps."""
    tok = smollm2_tokenizer
    jobs = [(at, *job(tok, TEXTS[i], n)) for at, i, n in plan]
    drive(RunningBatch(model, tok, prompt_lookup=lookup, prefill_chunk=chunk), [(at, j) for at, j, _ in jobs])
    for (_, i, n), (_, _, out) in zip(plan, jobs):
        assert out.summary() == alone(model, tok, TEXTS[i], n, prefill_chunk=chunk)


def test_a_long_prompt_joining_reads_a_chunk_per_step_while_the_running_rows_go_on(model, smollm2_tokenizer):
    """A joining prompt is read prefill_chunk codes a step, in between the running row's steps: the running
    row gets its code every step, and the joiner starts once its whole prompt is read."""
    tok = smollm2_tokenizer
    batch = RunningBatch(model, tok, prefill_chunk=8)
    (a, out_a), (b, out_b) = job(tok, TEXTS[1], 200), job(tok, "".join(TEXTS), 10)
    ended = batch.join([a])
    while not len(batch):
        ended += batch.step()
    ended += batch.join([b])
    n_codes = len(model.codec.encode(b.prompt_ids))
    steps, written = 0, []
    while batch.joining:
        ended += batch.step()
        steps += 1
        written.append(len(batch.rows[0].codes))
    assert steps == -(-n_codes // 8) and n_codes > 40  # ceil(codes / 8) steps of reading
    assert batch.rows[0].owner.job is a and batch.rows[1].owner.job is b
    assert written == list(range(written[0], written[0] + steps))  # the running row wrote a code each step
    while batch.busy:
        ended += batch.step()
    for j, r in ended:
        j.emit(r)
    assert out_a.summary() == alone(model, tok, TEXTS[1], 200, prefill_chunk=8)
    assert out_b.summary() == alone(model, tok, "".join(TEXTS), 10, prefill_chunk=8)


def test_concat_and_compact_leave_every_rows_logits_as_they_were(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    V = model.codec.base_vocab_size

    def started(text):
        s = model.new_session(1)
        codes = np.asarray([model.codec.encode(tok(text)["input_ids"])])
        return s, s.feed(codes, np.ones_like(codes))[0]

    with torch.no_grad():
        singles = [started(t) for t in TEXTS[:3]]
        joined = HyperSession.concat([started(t)[0] for t in TEXTS[:3]])
        for _ in range(6):
            codes = [int(lg.argmax()) for _, lg in singles]
            singles = [(s, s.step([c])[1]) for (s, _), c in zip(singles, codes)]
            both = joined.step(codes)[1]
            for b, (_, lg) in enumerate(singles):
                torch.testing.assert_close(both[b: b + 1], lg, atol=1e-5, rtol=1e-5)
        joined = joined.select(np.array([1]))
        joined.compact()
        assert joined.mask.shape[1] == int(joined.code_len[0])
        c = int(singles[1][1].argmax())
        torch.testing.assert_close(joined.step([c])[1], singles[1][0].step([c])[1], atol=1e-5, rtol=1e-5)
    assert any(c >= V for s, _ in singles for c in s.history[0])  # hypertokens were read in the batch
    with pytest.raises(InputTypeError, match=re.escape("parts must be a non-empty list of HyperSessions, got []")):
        HyperSession.concat([])
    with pytest.raises(StateError, match="a static session holds one sequence in a cache of its own"):
        HyperSession.concat([model.new_session(1), model.new_session(1, max_length=8)])


def test_the_engine_batches_concurrent_requests_and_reports_the_batch_size(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    engine = Engine(model, tok, max_batch_size=3)
    try:
        outs = []
        for t in TEXTS:
            j, out = job(tok, t, 40)
            outs.append(out)
            engine.submit(j)
        seen = set()
        while not all(o.done.is_set() for o in outs):
            seen.add(engine.running)
            time.sleep(0.002)
        assert max(seen) == 3  # never more than max_batch_size, and more than one at a time
        assert [o.summary() for o in outs] == [alone(model, tok, t, 40) for t in TEXTS]
        assert engine.stats()["served"] == 5 and engine.running == 0
    finally:
        engine.close()
    with pytest.raises(ConfigError, match="max_batch_size must be an int >= 1, got 0"):
        Engine(model, tok, max_batch_size=0)
    with pytest.raises(ConfigError, match="prefill_chunk must be an int >= 0, got -1"):
        Engine(model, tok, prefill_chunk=-1)


def test_a_failing_step_ends_its_batch_with_an_error_and_the_engine_goes_on(model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    engine = Engine(model, tok, max_batch_size=4)

    def fail_with_two_rows(_module, _args, kwargs):  # a step of two requests together fails
        if kwargs["input_ids"].shape[0] == 2:
            raise RuntimeError("out of memory (simulated by a forward hook)")

    hook = model.base.register_forward_pre_hook(fail_with_two_rows, with_kwargs=True)
    try:
        (a, out_a), (b, out_b) = job(tok, TEXTS[0], 20), job(tok, TEXTS[1], 20)
        engine.submit(a)
        engine.submit(b)
        assert out_a.done.wait(60) and out_b.done.wait(60)
        assert (out_a.end.finish_reason, out_b.end.finish_reason) == ("error", "error")
        assert out_a.end.error == "RuntimeError: out of memory (simulated by a forward hook)"
        hook.remove()
        c, out_c = job(tok, TEXTS[2], 10)
        engine.submit(c)
        assert out_c.done.wait(60) and out_c.summary() == alone(model, tok, TEXTS[2], 10)
        assert engine.stats()["finish_reasons"] == {"error": 2, "length": 1}
    finally:
        hook.remove()
        engine.close()
