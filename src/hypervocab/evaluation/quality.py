"""What a model writes: its continuations of held-out prompts, judged by the base model.

Bits per byte of given text says how a model *reads*.  A hypervocab model also *writes* hypertokens,
and text that reads well can still be written badly (identifiers spliced mid-word, a phrase repeated
until the budget runs out).  Two figures judge every output, both against the base model's own
output on the same prompt:

* **bits per byte under the base model**: the base model (LoRA off) scores the output's base tokens
  given the prompt's, in nats, over the output's UTF-8 bytes.  The base model's own greedy text scores
  low (it is what it would have written); broken words and loops score high.  A domain's figure is its
  outputs' nats summed over their bytes summed.
* **distinct-4-gram ratio** of the output's base tokens (:func:`distinct_ngram_ratio`): loops score low.

An output of a system is *worse* than the base model's when, over a domain, its bits per byte exceed
:data:`MAX_BPB_RATIO` times the base model's, or its distinct-4-gram ratio falls below
:data:`MIN_DISTINCT_RATIO` times the base model's (the thresholds of issue 25's goal).  ``eval speed``
and ``hypervocab demo`` print the same figures next to every speed and mark a speed-up whose text is
worse: a speed-up at worse quality is not a speed-up.

Systems: ``base`` (the base model, Hugging Face greedy, LoRA off), ``hypervocab`` (greedy, its live
vocabulary), ``hypervocab_lookup`` (the same with its prompt lookup decoding: the same text, unless a
tie is broken differently), and with ``sample=True`` also ``base_sampled`` and ``hypervocab_sampled``
(judged against ``base_sampled``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputTypeError, check_int

if TYPE_CHECKING:
    from ..model import HyperModel

__all__ = ["CHAT_QUESTIONS", "MAX_BPB_RATIO", "MIN_DISTINCT_RATIO", "SYSTEMS", "GenerationPrompt",
           "GenerationResult", "QualityRow", "WrittenText", "base_bits", "bits_per_byte", "chat_prompts",
           "distinct_ngram_ratio", "format_value", "generation_report", "is_worse", "model_name", "quality_marker",
           "quality_rows", "text_prompts"]

MAX_BPB_RATIO = 1.25  # an output's base-model bits per byte may be at most this times the base model's own
MIN_DISTINCT_RATIO = 0.9  # its distinct-4-gram ratio at least this times the base model's own
SYSTEMS: tuple[str, ...] = ("base", "hypervocab", "hypervocab_lookup", "base_sampled", "hypervocab_sampled")
REFERENCE = {"base": "base", "hypervocab": "base", "hypervocab_lookup": "base", "base_sampled": "base_sampled",
             "hypervocab_sampled": "base_sampled"}

# questions a chat model answers in prose and code; none of them is in the training data
CHAT_QUESTIONS: tuple[str, ...] = (
    "What is the difference between a list and a tuple in Python? Give an example.",
    "Explain in a few sentences how a hash table finds a key.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Why does the sky look blue during the day and red at sunset?",
    "Give three tips for writing clear commit messages.",
    "What does the HTTP status code 404 mean, and when should a server return 410 instead?",
)


# ---------------------------------------------------------------------------------------------- the figures


def distinct_ngram_ratio(ids: Sequence[int], n: int = 4) -> float:
    """Distinct n-grams of ``ids`` over all its n-grams (1.0: nothing repeats; 1.0 when there are none).

    ``ids`` are base token ids (compare outputs in the same tokenization), ``n`` >= 1.

    >>> distinct_ngram_ratio([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4])  # 9 4-grams, 4 of them distinct
    0.4444444444444444
    """
    check_int("n", n, minimum=1)
    if isinstance(ids, (str, bytes)) or not all(isinstance(i, int) or hasattr(i, "__index__") for i in ids):
        raise InputTypeError(f"ids must be a sequence of token ids, got {type(ids).__name__}")
    grams = [tuple(int(i) for i in ids[k: k + n]) for k in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def bits_per_byte(nll: float, n_bytes: int) -> float | None:
    """Nats over ``n_bytes`` bytes as bits per byte (``None`` for no bytes)."""
    return nll / math.log(2) / n_bytes if n_bytes else None


def base_bits(model: HyperModel, tokenizer: Any, prompt: Sequence[int], output: Sequence[int]) -> tuple[float, int]:
    """The base model's negative log-likelihood of ``output`` given ``prompt`` (nats), and its UTF-8 bytes.

    Both are base token ids; the base model (LoRA off) reads them as they are.  Special tokens (an
    end-of-sequence the model wrote) are scored but have no bytes.
    """
    from .likelihood import continuation_logprob  # imports torch

    output = [int(i) for i in output]
    if not output:
        return 0.0, 0
    nll = -continuation_logprob(model, list(prompt), output, base=True).logprob
    return nll, len(tokenizer.decode(output, skip_special_tokens=True).encode("utf-8"))


def is_worse(bits_per_byte_ratio: float | None, distinct_ratio: float | None) -> bool | None:
    """Whether text with these ratios to the base model's is worse than it (``None``: nothing to judge).

    >>> is_worse(1.1, 0.95), is_worse(1.4, 1.0), is_worse(1.0, 0.5), is_worse(None, None)
    (False, True, True, None)
    """
    if bits_per_byte_ratio is None and distinct_ratio is None:
        return None
    return bool((bits_per_byte_ratio is not None and bits_per_byte_ratio > MAX_BPB_RATIO)
                or (distinct_ratio is not None and distinct_ratio < MIN_DISTINCT_RATIO))


def quality_marker(worse: bool | None) -> str:
    """What a speed table prints after a speed-up: nothing when the text is as good as the base model's."""
    return " (worse text)" if worse else ""


# ---------------------------------------------------------------------------------------------- prompts


@dataclass
class GenerationPrompt:
    """One prompt: its domain, where it came from (``file:token``, or ``chat:k``) and its base token ids."""

    domain: str
    source: str
    ids: list[int]
    chat: bool = False


def text_prompts(domain: str, texts: Sequence[tuple[str, str]], tokenizer: Any, *, places: int = 3,
                 prompt_tokens: int = 256) -> list[GenerationPrompt]:
    """Prompts cut from real files: in each text, ``places`` cuts spread evenly through it, each prompt the
    ``prompt_tokens`` base tokens before its cut (or from the start).

    ``texts`` are ``(source name, text)`` pairs.  A cut moves back to just after a token holding a line end
    (with the next line's indentation, as tokenizers merge them) when one is within the last quarter of
    the prompt, so that the model starts a line, as an editor asks it to.  Texts of under 32 base tokens
    are skipped.
    """
    check_int("places", places, minimum=1)
    check_int("prompt_tokens", prompt_tokens, minimum=16)
    out = []
    for source, text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) < 32:
            continue
        for k in range(1, places + 1):
            cut = max(16, len(ids) * k // (places + 1))
            for back in range(min(prompt_tokens // 4, cut - 16)):
                if "\n" in tokenizer.decode(ids[cut - back - 1: cut - back]):
                    cut -= back
                    break
            out.append(GenerationPrompt(domain, f"{source}:{cut}", ids[max(0, cut - prompt_tokens): cut]))
    return out


def chat_prompts(tokenizer: Any, questions: Sequence[str], *, domain: str = "chat") -> list[GenerationPrompt]:
    """One prompt per question: a user turn in the tokenizer's chat template (or the bare question and a
    line end when it has none), ready for the answer."""
    out = []
    templated = bool(getattr(tokenizer, "chat_template", None))
    for k, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise ConfigError(f"questions[{k}] must be a non-empty str, got {q!r}")
        if templated:
            text = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds them already
        else:
            ids = tokenizer(q + "\n")["input_ids"]
        out.append(GenerationPrompt(domain, f"chat:{k}", list(ids), chat=True))
    return out


# ---------------------------------------------------------------------------------------------- results


@dataclass
class WrittenText:
    """One output of one system on one prompt, with its figures.

    nll: the base model's nats for the output given the prompt; bytes: its UTF-8 bytes; distinct_4: its
    distinct-4-gram ratio; codes / hypertokens: what a hypervocab system emitted (``None`` for the base
    model); text: the output, decoded.
    """

    domain: str
    source: str
    system: str
    prompt_tokens: int
    new_tokens: int
    nll: float
    bytes: int
    distinct_4: float
    text: str
    codes: int | None = None
    hypertokens: int | None = None

    @property
    def bits_per_byte(self) -> float | None:
        return bits_per_byte(self.nll, self.bytes)

    @property
    def base_tokens_per_code(self) -> float:
        return self.new_tokens / self.codes if self.codes else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(bits_per_byte=self.bits_per_byte, base_tokens_per_code=self.base_tokens_per_code)
        return d


@dataclass
class QualityRow:
    """One domain x system: the base model's bits per byte of every output together (nats over bytes),
    the mean distinct-4-gram ratio, base tokens per code and hypertoken share, and the two ratios to the
    reference system (``base``, or ``base_sampled`` for sampled systems) with the verdict."""

    domain: str
    system: str
    outputs: int
    bits_per_byte: float | None
    distinct_4: float
    base_tokens_per_code: float
    hypertoken_share: float
    bits_per_byte_ratio: float | None = None
    distinct_ratio: float | None = None
    worse: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    """What :func:`generation_report` measured: a row per domain x system (a ``total`` domain over every
    output too), every output, and the settings."""

    rows: list[QualityRow]
    outputs: list[WrittenText]
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, domain: str, system: str) -> QualityRow:
        """The row of ``domain`` and ``system``."""
        for r in self.rows:
            if r.domain == domain and r.system == system:
                return r
        raise KeyError((domain, system))

    def to_dict(self) -> dict[str, Any]:
        return {"settings": dict(self.settings), "thresholds": {"max_bits_per_byte_ratio": MAX_BPB_RATIO,
                                                                "min_distinct_ratio": MIN_DISTINCT_RATIO},
                "rows": [r.to_dict() for r in self.rows], "outputs": [o.to_dict() for o in self.outputs]}

    def to_markdown(self, *, texts: int = 2) -> str:
        """The table, then up to ``texts`` outputs per domain and system, side by side with the base model's."""
        s = self.settings
        lines = [f"Continuations of {s.get('max_new_tokens', '?')} base tokens at most, "
                 f"{'sampled and ' if s.get('sample') else ''}greedy; every output scored by the base model (LoRA "
                 f"off) given its prompt.  *Worse*: bits per byte above {MAX_BPB_RATIO}x the base model's own, or a "
                 f"distinct-4-gram ratio below {MIN_DISTINCT_RATIO}x the base model's.", "",
                 "| domain | system | outputs | bits/byte (base-scored) | ratio | distinct-4 | ratio | "
                 "base tokens/code | hypertokens | verdict |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in self.rows:
            verdict = "—" if r.worse is None else "worse" if r.worse else "ok"
            lines.append(f"| {r.domain} | {r.system} | {r.outputs} | {format_value(r.bits_per_byte, '.3f')} | "
                         f"{format_value(r.bits_per_byte_ratio, '.2f', 'x')} | {r.distinct_4:.3f} | "
                         f"{format_value(r.distinct_ratio, '.2f', 'x')} | {r.base_tokens_per_code:.2f} | "
                         f"{r.hypertoken_share:.0%} | {verdict} |")
        if texts:
            lines += ["", "#### What they wrote", ""]
            for domain in dict.fromkeys(o.domain for o in self.outputs):
                sources = list(dict.fromkeys(o.source for o in self.outputs if o.domain == domain))[:texts]
                for source in sources:
                    lines.append(f"`{source}`")
                    lines.append("")
                    for o in self.outputs:
                        if o.source == source and o.domain == domain and o.system != "hypervocab_lookup":
                            bpb = format_value(o.bits_per_byte, ".2f")
                            lines += [f"- {o.system} ({bpb} bits/byte, distinct-4 {o.distinct_4:.2f}, "
                                      f"{o.base_tokens_per_code:.2f} tokens/code): `{_one_line(o.text)}`"]
                    lines.append("")
        return "\n".join(lines).rstrip()

    def plot(self, path: str | PathLike[str]) -> Path:
        """A PNG of both figures per domain, one bar per system, the thresholds drawn; returns its path."""
        from ..plots import plot_generation_quality

        return plot_generation_quality([r.to_dict() for r in self.rows], path,
                                       model=str(self.settings.get("model", "model")))


def format_value(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` in a table cell: formatted by ``spec``, or a dash where there is none."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _one_line(text: str, limit: int = 240) -> str:
    flat = text.replace("\\", "\\\\").replace("\n", "\\n").replace("`", "'")
    return flat if len(flat) <= limit else flat[:limit] + " ..."


# ---------------------------------------------------------------------------------------------- the report


def generation_report(model: HyperModel, tokenizer: Any, prompts: Sequence[GenerationPrompt], *,
                      max_new_tokens: int = 64, lookup: bool = True, prompt_lookup_num_tokens: int = 10,
                      sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                      ignore_eos: bool = False, progress: bool = False) -> GenerationResult:
    """Continue every prompt with the base model and with hypervocab; judge each output by the base model.

    The model is used as it is: put it in ``eval()`` mode (and on its device) first.

    Args:
        model: a :class:`~hypervocab.HyperModel` (LoRA on for hypervocab, off for the base model).
        tokenizer: its base Hugging Face tokenizer.
        prompts: from :func:`text_prompts` and :func:`chat_prompts`.

    Keyword Args:
        max_new_tokens: base tokens each system writes at most (hypervocab's budget is exact).
        lookup: also run hypervocab with its prompt lookup decoding (``prompt_lookup_num_tokens`` draft codes).
        sample: also sample from both (``temperature``, ``top_p``; prompt ``k`` uses seed ``seed + k``).
        ignore_eos: write ``max_new_tokens`` whatever; by default each stops at end-of-sequence as usual.
        progress: a tqdm bar over the prompts.
    """
    from ..model import HyperModel

    if not isinstance(model, HyperModel):
        raise InputTypeError(f"model must be a HyperModel, got {type(model).__name__}")
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_int("prompt_lookup_num_tokens", prompt_lookup_num_tokens, minimum=1)
    check_int("seed", seed, minimum=0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ConfigError(f"temperature must be a number > 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if isinstance(prompts, GenerationPrompt) or not prompts or \
            not all(isinstance(p, GenerationPrompt) for p in prompts):
        raise InputTypeError("prompts must be a non-empty list of GenerationPrompt (see text_prompts and "
                             f"chat_prompts), got {type(prompts).__name__}")
    if len(tokenizer) != model.config.base_vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but the model's base_vocab_size is "
                          f"{model.config.base_vocab_size}: give the model's own tokenizer")
    systems = [s for s in SYSTEMS if (lookup or s != "hypervocab_lookup") and (sample or not s.endswith("_sampled"))]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts) * len(systems), desc="eval generation", unit="output")
    outputs: list[WrittenText] = []
    for k, prompt in enumerate(prompts):
        for system in systems:
            new, codes, hyper = _write(model, tokenizer, system, prompt.ids, max_new_tokens=max_new_tokens,
                                       lookup=prompt_lookup_num_tokens, temperature=temperature, top_p=top_p,
                                       seed=seed + k, ignore_eos=ignore_eos)
            nll, n_bytes = base_bits(model, tokenizer, prompt.ids, new)
            outputs.append(WrittenText(prompt.domain, prompt.source, system, len(prompt.ids), len(new), nll, n_bytes,
                                       distinct_ngram_ratio(new), tokenizer.decode(new, skip_special_tokens=True),
                                       codes, hyper))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    settings = dict(model=model_name(model), device=str(next(model.parameters()).device),
                    dtype=str(next(model.parameters()).dtype).removeprefix("torch."), max_new_tokens=max_new_tokens,
                    lookup=lookup, prompt_lookup_num_tokens=prompt_lookup_num_tokens, sample=sample,
                    temperature=temperature if sample else None, top_p=top_p if sample else None,
                    seed=seed if sample else None, ignore_eos=ignore_eos, prompts=len(prompts),
                    domains={d: sum(p.domain == d for p in prompts) for d in dict.fromkeys(p.domain for p in prompts)},
                    max_codebook_size=model.config.max_codebook_size, max_subtokens=model.config.max_subtokens)
    return GenerationResult(quality_rows(outputs), outputs, settings)


def quality_rows(outputs: Sequence[WrittenText]) -> list[QualityRow]:
    """A row per domain x system (in the order first seen), then a ``total`` domain when there are several."""
    domains = list(dict.fromkeys(o.domain for o in outputs))
    systems = [s for s in SYSTEMS if any(o.system == s for o in outputs)]
    groups = [(d, [o for o in outputs if o.domain == d]) for d in domains]
    if len(domains) > 1:
        groups.append(("total", list(outputs)))
    rows = []
    for domain, outs in groups:
        for system in systems:
            mine = [o for o in outs if o.system == system]
            if not mine:
                continue
            n_bytes = sum(o.bytes for o in mine)
            codes = sum(o.codes if o.codes is not None else o.new_tokens for o in mine)
            rows.append(QualityRow(
                domain, system, len(mine),
                bits_per_byte=bits_per_byte(sum(o.nll for o in mine), n_bytes),
                distinct_4=statistics.fmean(o.distinct_4 for o in mine),
                base_tokens_per_code=sum(o.new_tokens for o in mine) / codes if codes else 1.0,
                hypertoken_share=sum(o.hypertokens or 0 for o in mine) / codes if codes else 0.0))
    for row in rows:
        ref = next((r for r in rows if r.domain == row.domain and r.system == REFERENCE[row.system]), None)
        if ref is None or ref is row:
            continue
        if row.bits_per_byte is not None and ref.bits_per_byte:
            row.bits_per_byte_ratio = row.bits_per_byte / ref.bits_per_byte
        if ref.distinct_4:
            row.distinct_ratio = row.distinct_4 / ref.distinct_4
        row.worse = is_worse(row.bits_per_byte_ratio, row.distinct_ratio)
    return rows


def _write(model: HyperModel, tokenizer: Any, system: str, prompt: list[int], *, max_new_tokens: int, lookup: int,
           temperature: float, top_p: float, seed: int, ignore_eos: bool) -> tuple[list[int], int | None, int | None]:
    """One output of ``system``: its new base ids, and the codes and hypertokens it emitted (hypervocab)."""
    import torch

    device = next(model.parameters()).device
    sampled = system.endswith("_sampled")
    if system.startswith("hypervocab"):
        codes = torch.tensor([[int(c) for c in model.codec.encode(prompt)]], device=device)
        options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, max_new_base_tokens=max_new_tokens,
                                       return_dict_in_generate=True, do_sample=sampled)
        if sampled:
            options.update(temperature=temperature, top_p=top_p, seed=seed)
        if system == "hypervocab_lookup":
            options["prompt_lookup_num_tokens"] = lookup
        if ignore_eos:
            options["eos_token_id"] = []
        with torch.no_grad():
            out = model.generate(codes, torch.ones_like(codes), **options)
        st = out.stats[0]
        return [int(i) for i in out.new_base_ids[0]], st.codes, st.hypertokens
    ids = torch.tensor([prompt], device=device)
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if isinstance(i, int)), 0)
    # num_beams=1 and repetition_penalty=1.0 override the model's generation_config: greedy means greedy
    hf: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sampled, num_beams=1, repetition_penalty=1.0,
                              pad_token_id=pad)
    if sampled:
        hf.update(temperature=temperature, top_p=top_p, top_k=0)
        torch.manual_seed(seed)
    if ignore_eos:
        hf["eos_token_id"] = []
    with torch.no_grad(), model.disable_adapter():
        out_ids = model.base.generate(ids, attention_mask=torch.ones_like(ids), **hf)
    return out_ids[0, ids.shape[1]:].tolist(), None, None


def model_name(model: HyperModel) -> str:
    """The base model's name or path, as reports print it."""
    config = getattr(model.base, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else type(model.base).__name__


def check_domains(prompts: Mapping[str, Sequence[GenerationPrompt]]) -> None:
    """Every domain has at least one prompt (a folder of tiny files gives none)."""
    empty = [d for d, ps in prompts.items() if not ps]
    if empty:
        raise ConfigError(f"no prompt could be cut from the files of domain(s) {', '.join(empty)}: give text files "
                          "of at least 32 base tokens")
