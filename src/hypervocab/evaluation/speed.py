"""Generation speed on three workloads: where hypervocab wins and where prompt lookup decoding wins.

The same prompts, built from real files, go to four systems:

``base``
    the base model as Hugging Face built it (LoRA adapter off, hypervocab's embedding and head wrappers
    taken out for the call), Hugging Face ``generate``, greedy;
``hypervocab``
    the :class:`~hypervocab.HyperModel` with its own :meth:`~hypervocab.HyperModel.generate`, greedy,
    reading the LZW compression of the same base tokens;
``prompt_lookup``
    the same plain base model with Hugging Face prompt lookup decoding
    (``prompt_lookup_num_tokens``): candidate continuations are copied from the context and verified
    in one forward pass;
``hypervocab_lookup``
    hypervocab with its own speculative decoding (:mod:`hypervocab.speculative`): drafts of up to
    ``prompt_lookup_num_tokens`` *codes*, checked in one forward pass; its output is hypervocab's greedy
    output, and every accepted code stands for one or more base tokens, so the two gains multiply.

and three workloads:

``edit``
    a code file given in full with an instruction to return it with one small change (a function
    renamed): the answer mostly copies the input, prompt lookup decoding's best case;
``document``
    a document followed by a question about it (answered by quoting it);
``free``
    the first part of a file, to be continued: little to copy.

Every system writes exactly ``max_new_base_tokens`` base tokens: end-of-sequence tokens are *ignored*
(no system stops on them, none is kept from writing them), so the four do the same amount of work.
Times come from a streamer that notes ``time.perf_counter()`` at each ``put``: both ``generate``
implementations put the prompt first, then each new chunk of base tokens (one token for greedy
Hugging Face, every accepted token of a verification step for prompt lookup, the base tokens of one
code for hypervocab).  Its tokens per step count forward passes (a draft's accepted codes share one).
From those:

* time to first token (TTFT): the call's start to the first new chunk;
* prefill throughput: prompt base tokens / TTFT (hypervocab reads fewer codes for the same tokens);
* decode throughput: base tokens written after the first chunk / time from the first chunk to the last;
* total: the whole call, start to return.

Each prompt runs ``repeats`` times per system, the systems taking turns (the order rotates every
repeat), so that the machine's drift hits all four alike; rows report medians over every run of a
workload.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputTypeError, check_int
from ..plots import plot_decode_speed
from ..textfiles import read_text_file
from .quality import (
    MAX_BPB_RATIO,
    MIN_DISTINCT_RATIO,
    base_bits,
    bits_per_byte,
    distinct_ngram_ratio,
    is_worse,
    model_name,
    quality_marker,
)
from .quality import format_value as _fmt  # one table-cell format for every evaluation

if TYPE_CHECKING:
    import torch

    from ..model import HyperModel

__all__ = ["SYSTEMS", "WORKLOADS", "SpeedPrompt", "SpeedResult", "SpeedRow", "SpeedRun", "build_prompt",
           "speed_report", "synchronize"]

WORKLOADS: tuple[str, ...] = ("edit", "document", "free")
SYSTEMS: tuple[str, ...] = ("base", "hypervocab", "prompt_lookup", "hypervocab_lookup")
LABELS = {"base": "base (HF greedy)", "hypervocab": "hypervocab (greedy)", "prompt_lookup": "HF prompt lookup",
          "hypervocab_lookup": "hypervocab + prompt lookup"}

# the question of the "document" workload: quoting invites copying, as retrieval-augmented answers do
DOCUMENT_QUESTION = "What are the main points of the document above? Quote its key sentences word for word."
_LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".rs": "rust", ".go": "go", ".c": "c",
              ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".java": "java", ".rb": "ruby", ".sh": "bash", ".md": "markdown"}
# a function definition in the languages above: the "edit" workload renames the first one it finds
_FUNCTION = re.compile(r"^[ \t]*(?:pub[ \t]+)?(?:async[ \t]+)?(?:def|function|func|fn)[ \t]+([A-Za-z_]\w*)[ \t]*[(<]",
                       re.MULTILINE)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class SpeedPrompt:
    """One prompt: where its text came from and what each system reads.

    tokens: base tokens of the whole prompt (template and instruction included); codes: its length
    once compressed (what hypervocab reads); truncated: the file was cut to fit ``max_prompt_tokens``;
    outputs: per system, the new base tokens its first run wrote (``tokenizer.decode`` them to read).
    """

    workload: str
    source: str
    tokens: int
    codes: int
    truncated: bool
    chat: bool
    outputs: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class SpeedRun:
    """One timed ``generate`` call.

    new_tokens: base tokens written; first_tokens: how many came with the first chunk; steps: chunks
    (one per forward pass that wrote something: tokens for greedy, verification steps for prompt
    lookup, codes for hypervocab, codes less accepted draft codes for hypervocab with lookup); ttft_s /
    decode_s / total_s: see the module docstring; prompt_codes, codes, hypertokens: hypervocab only;
    matches_base: leading new tokens identical to the base system's on the same prompt (first repeat
    only, else ``None``).
    """

    workload: str
    system: str
    source: str
    repeat: int
    prompt_tokens: int
    new_tokens: int
    first_tokens: int
    steps: int
    ttft_s: float
    decode_s: float
    total_s: float
    prompt_codes: int | None = None
    hypertokens: int | None = None
    matches_base: int | None = None
    codes: int | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Base tokens per second after the first chunk; ``None`` when the first chunk held every token."""
        n = self.new_tokens - self.first_tokens
        if n <= 0:
            return None
        return n / self.decode_s if self.decode_s > 0 else math.inf

    @property
    def total_tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s,
                 total_tokens_per_s=self.total_tokens_per_s)
        return d


@dataclass
class SpeedRow:
    """One workload x system: medians over every run of every prompt of the workload.

    decode_speedup / total_speedup: decode throughput and whole-call time against the ``base`` row of the
    same workload (``None`` without one).  same_as_base: median share of the new tokens that equal the
    base system's, counted from the start up to the first difference (1.0: the same text).  codes,
    base_tokens_per_code, hypertokens, prompt_codes: hypervocab only.  bits_per_byte and distinct_4: what
    the system wrote (first runs), judged by :mod:`hypervocab.evaluation.quality` (the base model's bits per
    byte given the prompt, distinct-4-gram ratio); worse: whether that text is worse than ``base``'s by the
    thresholds there, so that its speed-up does not count.
    """

    workload: str
    system: str
    runs: int
    prompt_tokens: float
    new_tokens: float
    prefill_tokens_per_s: float
    ttft_s: float
    decode_tokens_per_s: float | None
    total_s: float
    total_tokens_per_s: float
    tokens_per_step: float
    same_as_base: float | None = None
    decode_speedup: float | None = None
    total_speedup: float | None = None
    prompt_codes: float | None = None
    codes: float | None = None
    base_tokens_per_code: float | None = None
    hypertokens: float | None = None
    bits_per_byte: float | None = None
    distinct_4: float | None = None
    worse: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SpeedResult:
    """What :func:`speed_report` measured: one :class:`SpeedRow` per workload x system, and every run."""

    rows: list[SpeedRow]
    runs: list[SpeedRun]
    prompts: list[SpeedPrompt]
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, workload: str, system: str) -> SpeedRow:
        """The row of ``workload`` and ``system``."""
        for r in self.rows:
            if r.workload == workload and r.system == system:
                return r
        raise KeyError((workload, system))

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able (undefined numbers are ``None``, never NaN)."""
        return {"settings": dict(self.settings), "rows": [r.to_dict() for r in self.rows],
                "prompts": [asdict(p) for p in self.prompts], "runs": [r.to_dict() for r in self.runs]}

    def to_markdown(self) -> str:
        """A table: one line per workload x system, speed-ups against the base system of the workload."""
        s = self.settings
        intro = (f"Medians of {s.get('repeats', '?')} runs per prompt; every system writes "
                 f"{s.get('max_new_base_tokens', '?')} base tokens (end-of-sequence ignored), greedy; prompt lookup "
                 f"proposes {s.get('prompt_lookup_num_tokens', '?')} tokens.  Decode = base tokens after the first new "
                 "chunk per second; speed-ups are against `base` on the same workload.")
        if s.get("cache_implementation") == "static":
            intro += ("  Base and hypervocab greedy ran with a static KV cache (on a GPU, their decode steps "
                      "compiled into CUDA graphs); the prompt lookup systems with the dynamic one.")
        if any(r.bits_per_byte is not None for r in self.rows):
            intro += (f"  Bits/byte: the base model's of what each system wrote, given the prompt; *(worse text)*: "
                      f"above {MAX_BPB_RATIO}x base's bits per byte or under {MIN_DISTINCT_RATIO}x its distinct-4-gram "
                      "ratio, a speed-up that does not count.")
        header = ("| workload | system | prompt tokens | prefill tok/s | TTFT (s) | decode tok/s | decode speed-up | "
                  "total (s) | end-to-end speed-up | tokens/step | same as base | bits/byte | distinct-4 |")
        lines = [intro, "", header,
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            prompt = f"{r.prompt_tokens:.0f}" + (f" ({r.prompt_codes:.0f} codes)" if r.prompt_codes is not None else "")
            mark = quality_marker(r.worse)
            cells = [r.workload, r.system, prompt, _fmt(r.prefill_tokens_per_s, ".1f"), _fmt(r.ttft_s, ".3f"),
                     _fmt(r.decode_tokens_per_s, ".1f"), _fmt(r.decode_speedup, ".2f", "x" + mark),
                     _fmt(r.total_s, ".3f"), _fmt(r.total_speedup, ".2f", "x" + mark), _fmt(r.tokens_per_step, ".2f"),
                     _fmt(r.same_as_base, ".0%"), _fmt(r.bits_per_byte, ".3f"), _fmt(r.distinct_4, ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "hypervocab with its prompt lookup against Hugging Face prompt lookup alone (same run):", "",
                  "| workload | decode speed-up | end-to-end speed-up |", "| --- | ---: | ---: |"]
        for w in dict.fromkeys(r.workload for r in self.rows):
            try:
                ours, theirs = self.row(w, "hypervocab_lookup"), self.row(w, "prompt_lookup")
            except KeyError:
                continue
            decode = (ours.decode_tokens_per_s / theirs.decode_tokens_per_s
                      if ours.decode_tokens_per_s and theirs.decode_tokens_per_s else None)
            lines.append(f"| {w} | {_fmt(decode, '.2f', 'x')} | {_fmt(theirs.total_s / ours.total_s, '.2f', 'x')} |")
        return "\n".join(lines)

    def plot(self, path: str | PathLike[str]) -> Path:
        """Write a PNG bar chart of decode throughput per workload, one bar per system; returns its path."""
        return plot_decode_speed([r.to_dict() for r in self.rows], path, systems=SYSTEMS, labels=LABELS,
                                 model=self.settings.get("model", "model"))


# ---------------------------------------------------------------------------------------------- prompts


def _edit_instruction(code: str) -> str:
    """Rename the first function defined in ``code`` (a change of a few tokens in a long answer)."""
    names = [n for n in _FUNCTION.findall(code) if not (n.startswith("__") and n.endswith("__"))]
    if names:
        return f"Rename the function `{names[0]}` to `{names[0]}_v2`, everywhere it appears in this file."
    return "Add a one-line comment at the top of this file that says what the file is for."


def _render(workload: str, content: str, tokenizer: Any, *, chat: bool, language: str) -> list[int]:
    """Base token ids of the whole prompt of ``workload`` around ``content``."""
    if workload == "edit":
        code = f"```{language}\n{content.rstrip()}\n```"
        if chat:
            user = (f"{_edit_instruction(content)} Reply with the whole file, changed, in one code block, and nothing "
                    f"else.\n\n{code}")
        else:  # a base model continues text: open the answer's code block for it
            text = f"{_edit_instruction(content)}\n\n{code}\n\nThe same file with that change:\n\n```{language}\n"
    elif workload == "document":
        user = f"{content.rstrip()}\n\n{DOCUMENT_QUESTION}"
        text = f"{content.rstrip()}\n\nQuestion: {DOCUMENT_QUESTION}\nAnswer:"
    else:
        user = f"Continue this text from where it stops, without repeating it.\n\n{content}"
        text = content
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template holds them already
    return list(tokenizer(text)["input_ids"])


def build_prompt(workload: str, text: str, tokenizer: Any, *, max_prompt_tokens: int, chat: bool,
                 language: str = "") -> tuple[list[int], bool]:
    """The base token ids of one prompt of ``workload`` made from ``text``, and whether ``text`` was cut.

    The text is cut (never the instruction or the template) so that the whole prompt holds at most
    ``max_prompt_tokens`` base tokens; ``edit`` and ``document`` texts are cut at a line end.  ``chat``
    wraps the prompt in the tokenizer's chat template as one user turn; ``language`` names the code
    block of ``edit`` prompts (``"python"``).
    """
    _check_name("workload", workload, WORKLOADS)
    check_int("max_prompt_tokens", max_prompt_tokens, minimum=1)
    ids = _render(workload, text, tokenizer, chat=chat, language=language)
    if len(ids) <= max_prompt_tokens:
        return ids, False
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max_prompt_tokens - (len(ids) - len(body))  # what the wrapper leaves, estimated; corrected below
    for _ in range(32):
        if keep < 1:
            break
        cut = tokenizer.decode(body[:keep])
        nl = cut.rfind("\n")
        if workload != "free" and nl > len(cut) // 2:
            cut = cut[: nl + 1]  # whole lines: a file cut mid-line reads as broken code
        ids = _render(workload, cut, tokenizer, chat=chat, language=language)
        if len(ids) <= max_prompt_tokens:
            return ids, True
        keep -= len(ids) - max_prompt_tokens  # token boundaries moved when the text was cut: try again shorter
    floor = len(_render(workload, "", tokenizer, chat=chat, language=language)) + 1
    raise ConfigError(f"max_prompt_tokens must be at least {floor} for the {workload!r} workload (its instruction "
                      f"and template take {floor - 1} base tokens), got {max_prompt_tokens}")


# ---------------------------------------------------------------------------------------------- checks


def _check_name(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _file_lists(files: Any) -> dict[str, list[Path]]:
    """``{workload: [paths]}`` from the caller's mapping, checked: known workloads, existing text files."""
    if not isinstance(files, Mapping):
        raise InputTypeError(f"files must be a mapping of workload name to file path(s), got {type(files).__name__}")
    if not files:
        raise ConfigError(f"files must name at least one workload of {', '.join(map(repr, WORKLOADS))}, got {{}}")
    out: dict[str, list[Path]] = {}
    for workload in files:
        if workload not in WORKLOADS:
            raise ConfigError(f"files has an unknown workload {workload!r}: the workloads are "
                              f"{', '.join(map(repr, WORKLOADS))}")
    for workload in WORKLOADS:  # a fixed order, whatever the mapping's
        if workload not in files:
            continue
        given = files[workload]
        paths = [given] if isinstance(given, (str, PathLike)) else list(given) if isinstance(given, Sequence) else None
        if not paths or not all(isinstance(p, (str, PathLike)) for p in paths):
            raise ConfigError(f"files[{workload!r}] must be a file path or a non-empty list of them, got {given!r}")
        for p in paths:
            if not Path(p).is_file():
                raise ConfigError(f"files[{workload!r}] holds {str(p)!r}, which is not a file: give existing text "
                                  "files")
        out[workload] = [Path(p) for p in paths]
    return out


def _read(workload: str, path: Path) -> str:
    text = read_text_file(path)
    if text is None:
        raise ConfigError(f"files[{workload!r}] holds {str(path)!r}, which is not UTF-8 text: give text files")
    if not text.strip():
        raise ConfigError(f"files[{workload!r}] holds {str(path)!r}, which is empty: give files with some text")
    return text


# ---------------------------------------------------------------------------------------------- timing


class _Clock:
    """A streamer that notes ``time.perf_counter()`` as each chunk of new base tokens arrives.

    The first ``put`` is the prompt (both ``generate`` implementations start with it) and is skipped.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.sizes: list[int] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        t = time.perf_counter()  # first: what follows is bookkeeping, not the model's time
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.times.append(t)
        self.sizes.append(len(ids))
        self.tokens.extend(int(i) for i in ids)

    def end(self) -> None:
        pass


@contextmanager
def _plain_base(model: HyperModel) -> Iterator[Any]:
    """The base model as Hugging Face built it, for the length of a ``with``: LoRA off, wrappers out.

    hypervocab's embedding and head wrappers cost a little at every step (a check for hypertoken ids, a
    ``[B, T, V + C]`` copy of the logits): the base systems must not pay for them.  They are put back
    on the way out, whatever happens.
    """
    from ..embedding import HyperEmbedding, HyperHead

    base = model.base
    with model.disable_adapter():
        inner = base.get_base_model() if hasattr(base, "peft_config") else base
        emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
        if isinstance(emb, HyperEmbedding):
            inner.set_input_embeddings(emb.base)
        if isinstance(head, HyperHead):
            inner.set_output_embeddings(head.base)
        try:
            yield inner
        finally:
            inner.set_input_embeddings(emb)
            inner.set_output_embeddings(head)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS; nothing to wait for on the CPU).

    GPU kernels run after the call that queued them returns: read the clock only after this, so that a
    timestamp means the work is done.  (The streamers' timestamps need no call: what they are given was
    already copied to the CPU, which waits.)
    """
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _run_once(model: HyperModel, system: str, ids: list[int], codes: list[int], *, new_tokens: int,
              lookup: int, pad_id: int, cache: str = "dynamic") -> tuple[_Clock, float, float, dict[str, int]]:
    """One greedy ``generate`` call of ``system``.

    ``ids``: the prompt's base tokens; ``codes``: the same compressed (hypervocab reads these); ``cache``:
    the KV cache of the two plain greedy systems (``"static"``: compiled into CUDA graphs on a GPU, by
    Hugging Face for the base model and by :mod:`hypervocab.static_cache` for hypervocab; the prompt
    lookup systems keep the dynamic cache their drafts need).  Returns the clock, the call's start and
    end (``time.perf_counter()``) and hypervocab's statistics.
    """
    import torch

    device = next(model.parameters()).device
    clock = _Clock()
    extra: dict[str, int] = {}
    if system in ("hypervocab", "hypervocab_lookup"):
        x = torch.tensor([codes], device=device)
        mask = torch.ones_like(x)
        synchronize(device)
        t0 = time.perf_counter()
        lookup_on = system == "hypervocab_lookup"
        out = model.generate(x, mask, max_new_tokens=new_tokens, max_new_base_tokens=new_tokens, eos_token_id=[],
                             streamer=clock, return_dict_in_generate=True,
                             prompt_lookup_num_tokens=lookup if lookup_on else None,
                             cache_implementation="dynamic" if lookup_on else cache)
        synchronize(device)
        t1 = time.perf_counter()
        st = out.stats[0]
        extra = {"prompt_codes": st.prompt_codes, "hypertokens": st.hypertokens, "codes": st.codes,
                 "steps": st.codes - st.accepted_codes}
        return clock, t0, t1, extra
    x = torch.tensor([ids], device=device)
    mask = torch.ones_like(x)
    # eos_token_id=[]: no stopping, no masking, as hypervocab's eos_token_id=[]; repetition_penalty=1.0 and
    # num_beams=1 override whatever the model's generation_config says, so that greedy means greedy
    options: dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                                   eos_token_id=[], pad_token_id=pad_id, streamer=clock)
    if system == "prompt_lookup":
        options["prompt_lookup_num_tokens"] = lookup
    elif cache == "static":
        options["cache_implementation"] = "static"
    with _plain_base(model) as base, torch.no_grad():
        synchronize(device)
        t0 = time.perf_counter()
        base.generate(x, attention_mask=mask, **options)
        synchronize(device)
        t1 = time.perf_counter()
    return clock, t0, t1, extra


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(statistics.median(kept)) if kept else None


# ---------------------------------------------------------------------------------------------- the report


def speed_report(
    model: HyperModel,
    tokenizer: Any,
    files: Mapping[str, str | PathLike[str] | Sequence[str | PathLike[str]]],
    *,
    max_prompt_tokens: int = 1024,
    max_new_base_tokens: int = 128,
    prompt_lookup_num_tokens: int = 10,
    repeats: int = 3,
    warmup: bool = True,
    cache_implementation: str = "dynamic",
    chat_template: bool | None = None,
    quality: bool = True,
    progress: bool = False,
) -> SpeedResult:
    """Time base greedy, hypervocab greedy and prompt lookup decoding on the same prompts.

    Every system decodes greedily and ignores end-of-sequence tokens, so each writes exactly
    ``max_new_base_tokens`` base tokens; what is measured is described in the module docstring.  The
    model is used as it is: put it in ``eval()`` mode (and on its device) first.

    Args:
        model: a :class:`~hypervocab.HyperModel` (its LoRA adapter, if any, is on for ``hypervocab`` and off
            for the two base systems).
        tokenizer: the base Hugging Face tokenizer, or a :class:`~hypervocab.HyperTokenizer` over it.
        files: ``{workload: path or [paths]}`` for workloads among ``"edit"`` (code files), ``"document"``
            (prose) and ``"free"`` (any text); each file makes one prompt.

    Keyword Args:
        max_prompt_tokens: base tokens of a prompt at most, template included (the file is cut to fit).
        max_new_base_tokens: base tokens every system writes (end-of-sequence is ignored, so exactly this
            many); at least 2, so that something is left to time after the first token.
        prompt_lookup_num_tokens: tokens prompt lookup decoding proposes per step.
        repeats: timed runs of each prompt by each system; the systems take turns.
        warmup: run each system once, untimed, on the first prompt first (lazy initialisation, caches, and
            with a static cache on a GPU, compilation).
        cache_implementation: ``"dynamic"`` or ``"static"``: the KV cache of base greedy and hypervocab greedy
            (static: compiled into CUDA graphs on a GPU, for both, so that the comparison stays fair).
        chat_template: wrap prompts in the tokenizer's chat template; ``None``: when it has one.
        quality: judge what each system wrote (its first run) by the base model's bits per byte and the
            distinct-4-gram ratio, and mark speed-ups whose text is worse than the base model's.
        progress: show a progress bar (tqdm) over the runs.

    Returns:
        A :class:`SpeedResult`: one row per workload x system (medians), every run and every prompt.
    """
    from ..model import HyperModel

    if not isinstance(model, HyperModel):
        raise InputTypeError(f"model must be a HyperModel, got {type(model).__name__}")
    check_int("max_prompt_tokens", max_prompt_tokens, minimum=1)
    check_int("max_new_base_tokens", max_new_base_tokens, minimum=2)
    check_int("prompt_lookup_num_tokens", prompt_lookup_num_tokens, minimum=1)
    check_int("repeats", repeats, minimum=1)
    _check_name("cache_implementation", cache_implementation, ("dynamic", "static"))
    if chat_template not in (None, True, False):
        raise ConfigError(f"chat_template must be True, False or None (use it when the tokenizer has one), "
                          f"got {chat_template!r}")
    lists = _file_lists(files)
    tok, htok, chat = _speed_tokenizer(model, tokenizer, chat_template)

    prompts = _build_prompts(lists, htok, max_prompt_tokens=max_prompt_tokens, chat=chat)
    pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id, 0) if isinstance(i, int)), 0)
    bar = _progress_bar(progress, (len(SYSTEMS) if warmup else 0) + len(prompts) * repeats * len(SYSTEMS))
    if warmup:
        _, ids, codes = prompts[0]
        _warm_up(model, ids, codes, new_tokens=max_new_base_tokens, lookup=prompt_lookup_num_tokens, pad_id=pad_id,
                 bar=bar, cache=cache_implementation)

    runs: list[SpeedRun] = []
    for k, (prompt, ids, codes) in enumerate(prompts):
        runs += _timed_prompt(model, k, prompt, ids, codes, repeats=repeats, new_tokens=max_new_base_tokens,
                              lookup=prompt_lookup_num_tokens, pad_id=pad_id, bar=bar, cache=cache_implementation)
    if bar is not None:
        bar.close()
    rows = _rows(runs)
    if quality:
        _judge(model, tok, prompts, rows)
    return SpeedResult(rows, runs, [p for p, _, _ in prompts], dict(
        model=model_name(model), device=str(next(model.parameters()).device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""), threads=_threads(),
        max_prompt_tokens=max_prompt_tokens, max_new_base_tokens=max_new_base_tokens,
        prompt_lookup_num_tokens=prompt_lookup_num_tokens, repeats=repeats, warmup=warmup, chat_template=chat,
        cache_implementation=cache_implementation,
        eos="ignored", decoding="greedy", max_codebook_size=model.config.max_codebook_size,
        max_subtokens=model.config.max_subtokens, workloads=list(lists), versions=_versions(),
        files={w: [str(p) for p in ps] for w, ps in lists.items()}))


def _speed_tokenizer(model: HyperModel, tokenizer: Any, chat_template: bool | None) -> tuple[Any, Any, bool]:
    """The base tokenizer, a :class:`~hypervocab.HyperTokenizer` with the model's codec over it, and whether
    prompts are wrapped in the chat template."""
    from ..tokenizer import HyperTokenizer

    tok = tokenizer.tokenizer if isinstance(tokenizer, HyperTokenizer) else tokenizer
    htok = HyperTokenizer(tok, model.config)  # the model's own codec, whatever settings a given one had
    if len(tok) != model.config.base_vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} ids but the model's base_vocab_size is "
                          f"{model.config.base_vocab_size}: give the model's own tokenizer")
    has_template = bool(getattr(tok, "chat_template", None))
    if chat_template and not has_template:
        raise ConfigError("chat_template=True but the tokenizer has no chat template: give False or None")
    return tok, htok, has_template if chat_template is None else bool(chat_template)


def _progress_bar(show: bool, total: int) -> Any:
    """A tqdm bar over ``total`` runs, or None."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", desc="speed")


def _warm_up(model: HyperModel, ids: list[int], codes: list[int], *, new_tokens: int, lookup: int, pad_id: int,
             bar: Any, cache: str = "dynamic") -> None:
    """One untimed run of every system on the first prompt (lazy initialisation, caches)."""
    for system in SYSTEMS:
        if bar is not None:
            bar.set_description(f"warm-up {system}")
        _run_once(model, system, ids, codes, new_tokens=new_tokens, lookup=lookup, pad_id=pad_id, cache=cache)
        if bar is not None:
            bar.update(1)


def _build_prompts(lists: dict[str, list[Path]], htok: Any, *, max_prompt_tokens: int,
                   chat: bool) -> list[tuple[SpeedPrompt, list[int], list[int]]]:
    """``(prompt, its base ids, its codes)`` for every file of every workload."""
    tok = htok.tokenizer
    prompts = []
    for workload, paths in lists.items():
        for path in paths:
            ids, cut = build_prompt(workload, _read(workload, path), tok, max_prompt_tokens=max_prompt_tokens,
                                    chat=chat, language=_LANGUAGES.get(path.suffix, ""))
            codes = [int(c) for c in htok.codec.encode(ids)]  # the same base tokens, compressed
            prompts.append((SpeedPrompt(workload, str(path), len(ids), len(codes), cut, chat), ids, codes))
    return prompts


def _timed_prompt(model: HyperModel, k: int, prompt: SpeedPrompt, ids: list[int], codes: list[int], *, repeats: int,
                  new_tokens: int, lookup: int, pad_id: int, bar: Any, cache: str = "dynamic") -> list[SpeedRun]:
    """Every timed run of the ``k``-th prompt, the systems taking turns; fills ``prompt.outputs``."""
    runs: list[SpeedRun] = []
    first: dict[str, SpeedRun] = {}
    outputs: dict[str, list[int]] = {}
    for r in range(repeats):
        turn = (k + r) % len(SYSTEMS)  # the order rotates, so that no system always goes first
        for system in SYSTEMS[turn:] + SYSTEMS[:turn]:
            if bar is not None:
                bar.set_description(f"{prompt.workload} {system}")
            clock, t0, t1, extra = _run_once(model, system, ids, codes, new_tokens=new_tokens, lookup=lookup,
                                             pad_id=pad_id, cache=cache)
            if not clock.times:
                raise RuntimeError(f"{system} wrote no token on {prompt.source}: its generate() never called "
                                   "the streamer")
            run = SpeedRun(prompt.workload, system, prompt.source, r, prompt.tokens, new_tokens=len(clock.tokens),
                           first_tokens=clock.sizes[0], steps=extra.get("steps", len(clock.sizes)),
                           ttft_s=clock.times[0] - t0,
                           decode_s=clock.times[-1] - clock.times[0], total_s=t1 - t0,
                           prompt_codes=extra.get("prompt_codes"), hypertokens=extra.get("hypertokens"),
                           codes=extra.get("codes"))
            runs.append(run)
            if r == 0:
                first[system], outputs[system] = run, clock.tokens
            if bar is not None:
                bar.update(1)
    prompt.outputs = {system: outputs[system] for system in SYSTEMS}
    for system, run in first.items():
        run.matches_base = _common_prefix(outputs[system], outputs["base"])
    return runs


def _rows(runs: list[SpeedRun]) -> list[SpeedRow]:
    """Medians per workload x system, in the order of :data:`WORKLOADS` and :data:`SYSTEMS`."""
    rows = []
    for workload in WORKLOADS:
        for system in SYSTEMS:
            rs = [r for r in runs if r.workload == workload and r.system == system]
            if not rs:
                continue
            firsts = [r for r in rs if r.matches_base is not None]
            hyper = system.startswith("hypervocab")
            rows.append(SpeedRow(
                workload, system, len(rs), prompt_tokens=_median([r.prompt_tokens for r in rs]),
                new_tokens=_median([r.new_tokens for r in rs]),
                prefill_tokens_per_s=_median([r.prefill_tokens_per_s for r in rs]),
                ttft_s=_median([r.ttft_s for r in rs]),
                decode_tokens_per_s=_median([r.decode_tokens_per_s for r in rs]),
                total_s=_median([r.total_s for r in rs]),
                total_tokens_per_s=_median([r.total_tokens_per_s for r in rs]),
                tokens_per_step=_median([r.new_tokens / r.steps for r in rs]),
                same_as_base=_median([r.matches_base / r.new_tokens for r in firsts]) if firsts else None,
                prompt_codes=_median([r.prompt_codes for r in rs]) if hyper else None,
                codes=_median([r.codes for r in rs]) if hyper else None,
                base_tokens_per_code=_median([r.new_tokens / r.codes for r in rs if r.codes]) if hyper else None,
                hypertokens=_median([r.hypertokens for r in rs]) if hyper else None))
    for row in rows:
        base = next((b for b in rows if b.workload == row.workload and b.system == "base"), None)
        if base is None:
            continue
        if base.decode_tokens_per_s and row.decode_tokens_per_s is not None:
            row.decode_speedup = row.decode_tokens_per_s / base.decode_tokens_per_s
        if row.total_s > 0:
            row.total_speedup = base.total_s / row.total_s
    return rows


def _judge(model: HyperModel, tok: Any, prompts: list[tuple[SpeedPrompt, list[int], list[int]]],
           rows: list[SpeedRow]) -> None:
    """Fill each row's bits per byte (nats of every output over its bytes), distinct-4 ratio and verdict."""
    for row in rows:
        nll = n_bytes = 0.0
        distinct = []
        for prompt, ids, _ in prompts:
            if prompt.workload == row.workload:
                out = prompt.outputs[row.system]
                n, b = base_bits(model, tok, ids, out)
                nll, n_bytes = nll + n, n_bytes + b
                distinct.append(distinct_ngram_ratio(out))
        row.bits_per_byte = bits_per_byte(nll, n_bytes)
        row.distinct_4 = statistics.fmean(distinct) if distinct else None
    for row in rows:
        base = next((b for b in rows if b.workload == row.workload and b.system == "base"), None)
        if base is None or base is row:
            continue
        bpb = row.bits_per_byte / base.bits_per_byte if row.bits_per_byte is not None and base.bits_per_byte else None
        distinct_ratio = row.distinct_4 / base.distinct_4 if row.distinct_4 is not None and base.distinct_4 else None
        row.worse = is_worse(bpb, distinct_ratio)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"hypervocab": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
