"""The static decode path: same output as the dynamic one, fixed shapes and addresses, one graph per step.

CUDA graphs can't run here, but what they need can be checked on a CPU: the static step gives what
the ordinary step gives; its tensors keep their addresses from step to step; and ``torch.compile``
traces it as one graph (``fullgraph=True``, so a graph break fails) that later steps reuse without
recompiling.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hypervocab.errors import ConfigError, InputTypeError, StateError

from .models import V

TEXT = ("def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\n"
        "def sub(a, b):\n    return a - b\n\ndef add(a, b):\n    return a + b\n\ndef")


def run(tiny_model, tiny_htok, **kw):
    codes = tiny_htok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return tiny_model.generate(codes, max_new_tokens=40, max_new_base_tokens=60, eos_token_id=[],
                              return_dict_in_generate=True, output_logits=True, **kw)


def assert_same_run(got, want):
    assert got.new_codes == want.new_codes and got.new_base_ids == want.new_base_ids
    for a, b in zip(got.logits, want.logits, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)  # the same ids visible, the same legal next id
        torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)


def test_a_static_run_writes_what_a_dynamic_run_writes(tiny_model, tiny_htok):
    want = run(tiny_model, tiny_htok)
    got = run(tiny_model, tiny_htok, cache_implementation="static")
    assert_same_run(got, want)
    st = got.stats[0]
    assert st.hypertokens > 0 and st.codes > 20  # hypertokens were written and read on the static path


def test_the_static_step_keeps_its_tensors_where_they_are(tiny_model, tiny_htok):
    codes = tiny_htok(TEXT, return_tensors="np")["input_ids"]
    session = tiny_model.new_session(1, max_length=codes.shape[1] + 30, compiled=False)
    with torch.no_grad():
        logits, _, _ = session.feed(codes, np.ones_like(codes))
        st = session.static
        ptrs = {name: t.data_ptr() for name, t in (("in", session.in_table), ("out", session.out_table),
                                                   ("cand", session.cand), ("ok", session.cand_ok))}
        layer = session.cache.layers[0]
        kv = (layer.keys.data_ptr(), layer.values.data_ptr())
        context = st.context
        for _ in range(25):
            _, logits = session.step([int(logits.argmax())])
        assert {name: t.data_ptr() for name, t in (("in", session.in_table), ("out", session.out_table),
                                                   ("cand", session.cand), ("ok", session.cand_ok))} == ptrs
        assert (layer.keys.data_ptr(), layer.values.data_ptr()) == kv and st.context is context
        assert session.in_table.shape[1] == tiny_model.codec.max_codebook_size and int(session.count[0]) > 0
        with pytest.raises(StateError, match=re.escape(f"this static session's cache holds "
                                                           f"{codes.shape[1] + 30} codes")):
            for _ in range(10):
                _, logits = session.step([int(logits.argmax())])


def test_the_step_compiles_to_one_graph_that_every_later_step_reuses(tiny_model, tiny_htok):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    want = run(tiny_model, tiny_htok, cache_implementation="static", compile=False)
    # the "eager" backend: dynamo's trace and guards, without inductor's code generation (minutes on a CPU)
    got = run(tiny_model, tiny_htok, cache_implementation="static", compile="eager")
    assert_same_run(got, want)
    # one frame traced as one graph (fullgraph=True: a break would have raised), and 39 more steps reused it
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_continuing_after_a_static_run_is_continuing_after_a_dynamic_one(tiny_model, tiny_htok):
    want, got = run(tiny_model, tiny_htok), run(tiny_model, tiny_htok, cache_implementation="static")
    more = tiny_htok.encode_continuation("\n# and more\n", want)
    with torch.no_grad():
        a = tiny_model.generate(**more, past=want, max_new_tokens=8, eos_token_id=[])
        b = tiny_model.generate(**tiny_htok.encode_continuation("\n# and more\n", got), past=got, max_new_tokens=8,
                           eos_token_id=[])
    assert torch.equal(a, b)


def test_static_options_are_checked(tiny_model, tiny_htok, smollm2_tokenizer):
    codes = tiny_htok(TEXT, return_tensors="pt")["input_ids"]
    cases = [
        (dict(cache_implementation="paged"), "cache_implementation must be 'dynamic' or 'static', got 'paged'"),
        (dict(cache_implementation="static", prompt_lookup_num_tokens=4),
         "prompt_lookup_num_tokens reads drafts ahead, which needs cache_implementation='dynamic'"),
        (dict(compile=True), "compile= applies to the static decode step: give cache_implementation='static'"),
        (dict(cache_implementation="static", compile=1.5),
         "compile must be True, False, None or a torch.compile backend name, got 1.5"),
    ]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            tiny_model.generate(codes, max_new_tokens=2, **kw)
    two = torch.cat([codes, codes])
    with pytest.raises(ConfigError, match=re.escape("cache_implementation='static' runs one sequence: input_ids "
                                                    "has 2 rows")):
        tiny_model.generate(two, max_new_tokens=2, cache_implementation="static")
    out = tiny_model.generate(codes, max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(ConfigError, match=re.escape("cache_implementation='static' starts a new sequence")):
        tiny_model.generate(past=out, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(InputTypeError, match=re.escape("a static session holds one sequence (max_length given), "
                                                       "got batch_size=2")):
        tiny_model.new_session(2, max_length=10)
    session = tiny_model.new_session(1, max_length=codes.shape[1] + 4)
    with torch.no_grad():
        logits, _, _ = session.feed(codes.numpy(), np.ones(codes.shape, np.int64))
        session.append([int(logits.argmax())])
    with pytest.raises(StateError, match="read_ahead\\(\\) needs the dynamic KV cache"):
        session.read_ahead([int(V)])
