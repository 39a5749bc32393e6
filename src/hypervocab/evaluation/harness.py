"""An lm-evaluation-harness model type, ``"hypervocab"``, that scores and generates under compression.

Every request is split in text and in base tokens the way lm-eval's own Hugging Face
adapter splits it, and only then compressed: the context's codes are what the model
reads, the LZW pass goes on over the scored tokens with a code boundary where they
start, and the model is scored strictly on that canonical code sequence (see
:mod:`hypervocab.evaluation.likelihood`).  Lengths (``max_length``, ``max_gen_toks``)
count base tokens, so a task sees the same text limits as with ``--model hf``.

    python -m hypervocab.evaluation.harness --model hypervocab \\
        --model_args pretrained=runs/smollm2 --tasks arc_easy

or from Python::

    lm_eval.simple_evaluate(model=HyperLM(model=hyper_model, tokenizer=tok), tasks=["arc_easy"])

Requests are processed one at a time: ``batch_size`` is accepted (lm-eval passes it) and ignored.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model
except ImportError as e:  # lm-eval is an optional extra: say how to get it
    raise ImportError(f"the lm-eval model type needs lm-evaluation-harness ({e}): "
                      "pip install 'hypervocab[eval]'") from e

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, InputTypeError, check_int
from ..loading import load, resolve_device
from ..model import HyperModel
from ..tokenizer import load_tokenizer
from .likelihood import continuation_logprob, prefix_id, window_pairs

__all__ = ["HyperLM", "MODEL_NAME", "main", "register"]

MODEL_NAME = "hypervocab"
_log = logging.getLogger(__name__)
_MAX_LENGTH_CAP = 2048  # the default max_length: the base model's positions, at most this many
_DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that set no max_gen_toks
_GEN_KEYS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
             "repetition_penalty", "num_beams")


def _device(device: Any) -> torch.device:
    """``device`` as :func:`hypervocab.loading.resolve_device` reads it (``None`` or ``"auto"``: CUDA when
    available, else the CPU), except that CUDA on a machine without it is the CPU, with a warning.

    lm-eval's ``hf`` model falls back the same way, so that a command line written for a GPU machine
    also runs on a CPU-only one.
    """
    if isinstance(device, (str, torch.device)) and device != "auto":
        try:
            asked = torch.device(device)
        except (RuntimeError, TypeError):
            asked = None  # resolve_device names what is allowed
        if asked is not None and asked.type == "cuda" and not torch.cuda.is_available():
            _log.warning("device %r asked for, but CUDA is not available: running on the CPU", str(device))
            return torch.device("cpu")
    return resolve_device(device)


def _dtype(dtype: Any) -> Any:
    """``dtype`` as :func:`hypervocab.load` takes it; ``"torch.bfloat16"`` (as some configs write it) too."""
    if isinstance(dtype, str) and dtype.startswith("torch."):
        return dtype.removeprefix("torch.")
    return dtype


def _default_max_length(model: Any) -> int:
    """The base model's context (``max_position_embeddings`` or its older names), capped at 2048."""
    cfg = getattr(model.base, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):  # multimodal configs keep the text settings apart
        cfg = cfg.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, _MAX_LENGTH_CAP)
    return _MAX_LENGTH_CAP


def _given_model(model: Any, tokenizer: Any, *, base_model: Any, dtype: Any, device: Any) -> Any:
    """A :class:`~hypervocab.HyperModel` given as ``model=``, checked, and moved when ``device`` is given."""
    if not isinstance(model, HyperModel):
        raise InputTypeError(f"model must be a hypervocab HyperModel, got {type(model).__name__}")
    for name, value in (("base_model", base_model), ("dtype", dtype)):
        if value is not None:
            raise ConfigError(f"{name}={value!r} only applies when loading with pretrained=: "
                              "prepare the HyperModel you pass as model= instead")
    if tokenizer is None:
        raise ConfigError("model= needs tokenizer= (the base model's Hugging Face tokenizer)")
    return model if device is None else model.to(_device(device))


def _checked_tokenizer(tokenizer: Any, model: Any) -> Any:
    """``tokenizer`` (loaded when it is a name or folder), checked against the model's base vocabulary."""
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise InputTypeError(f"tokenizer must be a Hugging Face tokenizer or a name or folder to load one "
                             f"from, got {type(tokenizer).__name__}")
    V = model.codec.base_vocab_size
    if len(tokenizer) != V:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} ids but the model's config says "
                          f"base_vocab_size={V}: they do not belong together")
    return tokenizer


class HyperLM(LM):
    """A :class:`~hypervocab.HyperModel` as an lm-eval ``LM``, registered as ``"hypervocab"``.

    Build it from a saved hypervocab folder (what ``--model_args`` gives) or from objects::

        HyperLM(pretrained="runs/smollm2", dtype="bfloat16", device="cuda")
        HyperLM(model=hyper_model, tokenizer=hf_tokenizer)

    Keyword Args:
        pretrained: what :func:`hypervocab.load` takes: a folder made by :meth:`HyperModel.save_pretrained`,
            a checkpoint of the public zip2zip format, ``"default"`` (the shipped model), or a plain causal LM
            (wrapped with untrained hyper-encoders).  It is loaded with LoRA folded into the weights.
        model / tokenizer: a loaded :class:`~hypervocab.HyperModel` and its Hugging Face tokenizer, instead of
            ``pretrained``.  ``tokenizer`` may also be a name or folder to load (with ``pretrained``: instead of
            the tokenizer :func:`hypervocab.load` finds).
        base_model: a folder or hub name of the base model to load instead of the one the checkpoint names.
        dtype: the model's dtype when loading, as :func:`hypervocab.load` takes it: ``"auto"`` (default:
            bfloat16 on a GPU that has it, else float32), ``"float32"``, ``"bfloat16"``, ``"float16"`` (or
            ``"torch.float16"``, or a ``torch.dtype``).
        device: where the model runs, as :func:`hypervocab.load` takes it: ``"auto"`` (default when loading:
            CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``; a given model stays where
            it is unless ``device`` is given.  The model is put in eval mode either way.
            A CUDA device on a machine without CUDA falls back to the CPU, as with lm-eval's ``hf`` model.
        batch_size / max_batch_size: accepted because lm-eval passes them; requests run one at a time.
        max_length: the most base tokens the model reads in one forward (default: the base model's
            ``max_position_embeddings``, at most 2048).  Contexts are cut on the left to fit.
        add_bos_token: ``None`` tokenizes as the tokenizer does by default (like lm-eval's ``hf`` model);
            ``True``/``False`` force special tokens on or off.
        rolling_stride: for ``loglikelihood_rolling``, base tokens scored per window after the first
            (default ``max_length - 2``: like lm-eval's ``hf`` model, each window carries one token of
            context); smaller strides give each scored token more context and cost more forwards.
        trust_remote_code: accepted because lm-eval's ``--trust_remote_code`` passes it (its datasets still
            get it), but not passed on: :func:`hypervocab.load` runs no model's own code (a warning says so).
    """

    def __init__(self, *, pretrained: str | None = None, model: Any = None, tokenizer: Any = None,
                 base_model: str | None = None, dtype: Any = None, device: Any = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, max_length: int | None = None,
                 add_bos_token: bool | None = None, rolling_stride: int | None = None,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ConfigError("give pretrained= (a hypervocab model folder) or model= (a loaded HyperModel), "
                              f"exactly one; got pretrained={pretrained!r} and model={type(model).__name__}")
        if model is not None:
            model = _given_model(model, tokenizer, base_model=base_model, dtype=dtype, device=device)
        else:
            if trust_remote_code:  # lm-eval's --trust_remote_code sets it, for the datasets as much as the model
                _log.warning("trust_remote_code=True is not passed on: hypervocab.load runs no model's own code")
            if not isinstance(pretrained, str):
                raise InputTypeError(f"pretrained must be a folder path (str), got {type(pretrained).__name__}")
            # scoring only: load folds LoRA into the weights
            model, htok = load(pretrained, base_model=base_model, device=_device(device), dtype=_dtype(dtype))
            tokenizer = htok.tokenizer if tokenizer is None else tokenizer
        self.tokenizer = _checked_tokenizer(tokenizer, model)
        self._settings(model, batch_size, max_length, add_bos_token, rolling_stride)
        self.max_batch_size = max_batch_size

    def _settings(self, model: Any, batch_size: int | str, max_length: int | None, add_bos_token: bool | None,
                  rolling_stride: int | None) -> None:
        """Check and keep the settings that do not depend on how the model was given."""
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise ConfigError(f"add_bos_token must be True, False or None, got {add_bos_token!r}")
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        if not (isinstance(batch_size, str) and batch_size.startswith("auto")):
            check_int("batch_size", batch_size, minimum=1)
        max_length = _default_max_length(model) if max_length is None else max_length
        # three base tokens at least: the first rolling window reads the prefix plus max_length - 1
        # tokens, and each later window needs one token of context before what it scores
        check_int("max_length", max_length, minimum=3)
        if rolling_stride is not None:
            check_int("rolling_stride", rolling_stride, minimum=1)
            if rolling_stride > max_length - 2:
                raise ConfigError(f"rolling_stride must be at most max_length - 2 ({max_length - 2}), so that "
                                  f"each window keeps a token of context; got {rolling_stride}")
        self._model = model.eval()
        self._device = next(model.parameters()).device
        self._max_length = max_length
        self.batch_size = batch_size
        self.add_bos_token = add_bos_token
        self.rolling_stride = max_length - 2 if rolling_stride is None else rolling_stride
        self.prefix_token_id = prefix_id(self.tokenizer)

    # ------------------------------------------------------------------ properties

    @property
    def model(self) -> Any:
        """The :class:`~hypervocab.HyperModel` being evaluated."""
        return self._model

    @property
    def max_length(self) -> int:
        """The most base tokens the model reads in one forward."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Base tokens a generation request may produce when its ``gen_kwargs`` set no limit."""
        return _DEFAULT_MAX_GEN_TOKS

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-text id (lm-eval records it with the results)."""
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ tokenization

    def _encode(self, text: str) -> list[int]:
        """Base ids of ``text``, with special tokens as lm-eval's ``hf`` model adds them."""
        kwargs: dict[str, Any] = {}
        bos = getattr(self.tokenizer, "bos_token", None)
        if self.add_bos_token is not None:
            kwargs["add_special_tokens"] = self.add_bos_token
        elif isinstance(bos, str) and bos and text.startswith(bos):
            kwargs["add_special_tokens"] = False  # the prompt already starts with BOS: do not add a second
        return [int(t) for t in self.tokenizer(text, **kwargs)["input_ids"]]

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation base ids, split the way lm-eval's ``hf`` model splits them."""
        if context == "":
            return [self.prefix_token_id], [int(t) for t in self.tokenizer(
                continuation, add_special_tokens=False)["input_ids"]]
        # a trailing space belongs to the next word's token: move it to the continuation
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        # a context of only whitespace leaves nothing to condition on but the start of a text
        return ctx or [self.prefix_token_id], whole[len(ctx):]

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` for each ``(context, continuation)`` request.

        The context is cut on the left so that context and continuation fit ``max_length`` base tokens;
        ``is_greedy`` says whether greedy decoding picks every code of the continuation.
        """
        out = []
        for request in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = request.args
            ctx, target = self._split(context, continuation)
            room = self.max_length - len(target)
            if room < 1:
                raise ConfigError(f"a continuation of {len(target)} base tokens leaves no room for context "
                                  f"within max_length={self.max_length}: raise max_length")
            c = continuation_logprob(self.model, ctx[-room:], target)
            result = (c.logprob, c.greedy)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each ``(text,)`` request, every base token scored exactly once.

        The text is read after the prefix token (BOS, else EOS) in windows of ``max_length - 1`` tokens
        (:func:`~hypervocab.evaluation.likelihood.sliding_windows`, as in ``score_texts``), each window after
        the first scoring ``rolling_stride`` new tokens; every window is compressed on its own.
        """
        window = self.max_length - 1  # the first window also reads the prefix token
        out = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            ids = [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            total = 0.0
            for context, target in window_pairs(ids, self.prefix_token_id, window=window,
                                                stride=self.rolling_stride):
                total += continuation_logprob(self.model, context, target).logprob
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Text generated for each ``(context, gen_kwargs)`` request, cut before the first stop string.

        ``gen_kwargs``: ``until`` (a str or a list of them), ``max_gen_toks`` (base tokens, default 256),
        ``do_sample``, ``temperature`` (0 means greedy), ``top_p``, ``top_k``, ``repetition_penalty``.
        The context is cut on the left to leave ``max_gen_toks`` within ``max_length``; generation also
        ends at the model's EOS.
        """
        out = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = request.args
            until, max_gen_toks, options = self._generation_options(gen_kwargs)
            room = self.max_length - max_gen_toks
            if room < 1:
                raise ConfigError(f"max_gen_toks={max_gen_toks} leaves no room for the prompt within "
                                  f"max_length={self.max_length}: lower max_gen_toks or raise max_length")
            ids = (self._encode(context) or [self.prefix_token_id])[-room:]
            # compressed after the cut, so that the codes stand for exactly the kept base tokens
            codes = torch.as_tensor(self.model.codec.encode(ids), dtype=torch.long, device=self.device)[None]
            result = self.model.generate(codes, max_new_tokens=max_gen_toks, max_new_base_tokens=max_gen_toks,
                                         stop_strings=until or None, tokenizer=self.tokenizer,
                                         return_dict_in_generate=True, **options)
            text = self.tokenizer.decode(result.new_base_ids[0], skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=len(text))
            text = text[:cut]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generation_options(self, gen_kwargs: Any) -> tuple[list[str], int, dict[str, Any]]:
        """``(stop strings, max_gen_toks, options for generate)`` from a request's ``gen_kwargs``."""
        if not isinstance(gen_kwargs, dict):
            raise InputTypeError(f"gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
        unknown = sorted(set(gen_kwargs) - set(_GEN_KEYS))
        if unknown:
            raise ConfigError(f"generation arguments {unknown} are not supported by the hypervocab model; "
                              f"allowed: {', '.join(_GEN_KEYS)}")
        until = gen_kwargs.get("until")
        until = [] if until is None else [until] if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ConfigError(f"until must be a str or a list of str, got {gen_kwargs.get('until')!r}")
        until = [s for s in until if s]  # an empty stop string would end every generation at once
        limit = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens"))
        max_gen_toks = check_int("max_gen_toks", self.max_gen_toks if limit is None else limit, minimum=1)
        num_beams = gen_kwargs.get("num_beams", 1)
        if num_beams != 1:
            raise ConfigError(f"num_beams must be 1 (the hypervocab model has no beam search), got {num_beams!r}")
        temperature, do_sample = gen_kwargs.get("temperature"), gen_kwargs.get("do_sample")
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or temperature < 0):
            raise ConfigError(f"temperature must be a number >= 0 (0 for greedy decoding), got {temperature!r}")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")
        # lm-eval's conventions: without do_sample, a temperature above 0 means sampling; a temperature
        # of 0 means greedy decoding whatever do_sample says
        if do_sample is None:
            do_sample = temperature is not None and temperature > 0
        sample = bool(do_sample) and temperature != 0
        options: dict[str, Any] = {"do_sample": sample}
        if sample:
            for name in ("temperature", "top_p", "top_k"):
                if gen_kwargs.get(name) is not None:
                    options[name] = gen_kwargs[name]
        if gen_kwargs.get("repetition_penalty") is not None:
            options["repetition_penalty"] = gen_kwargs["repetition_penalty"]
        return until, max_gen_toks, options


def register() -> None:
    """Register :class:`HyperLM` with lm-eval's model registry as ``"hypervocab"`` (once; later calls do nothing)."""
    import lm_eval.models  # noqa: F401  lm-eval's own model names: its registry only adds them while empty

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(HyperLM)


register()


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the ``"hypervocab"`` model type registered; returns the exit status.

    ``argv`` (default ``sys.argv[1:]``) is what ``lm-eval`` itself takes, for example
    ``--model hypervocab --model_args pretrained=DIR --tasks arc_easy`` or ``run --help``.
    """
    from lm_eval.__main__ import cli_evaluate

    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if not all(isinstance(a, str) for a in args):
        raise InputTypeError(f"argv must be a list of str, got {argv!r}")
    saved = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse (--help, bad arguments) and lm-eval exit this way
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
