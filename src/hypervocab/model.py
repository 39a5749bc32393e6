"""``HyperModel``: a Hugging Face causal LM that reads and writes hypertokens.

The base model keeps its weights and its forward; its input embedding and LM
head are wrapped (:mod:`hypervocab.embedding`) so that ids ``>= V`` look up the
current sequence's hypertoken tables, which the hyper-encoders compute from the
phrases the LZW codebook holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .codebook import CodebookBatch, PreparedCodebooks
from .config import CONFIG_NAME, HyperConfig, bind_config
from .embedding import HeadContext, HyperEmbedding, HyperHead
from .errors import ConfigError, InputTypeError, InvalidCodeError
from .generation import generate
from .hyper_encoder import build_encoder, encoder_options
from .loss import next_code_targets, train_scores
from .positions import position_ids as compute_position_ids
from .session import HyperSession, attention_mask_of

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

__all__ = ["HyperModel", "HyperOutput", "WEIGHTS_NAME"]

WEIGHTS_NAME = "hypervocab_encoders.safetensors"
_LOSS_CHUNK = 1024  # positions per cross-entropy chunk


@dataclass
class HyperOutput:
    """loss (scalar or ``None``) and logits ``[B, T, V + C]`` of a full forward.

    Reading and writing a code at a time (a KV cache and growing codebooks) is a
    :class:`~hypervocab.session.HyperSession`'s job: :meth:`HyperModel.new_session`.

    With ``compute_logits=False``: no logits; ``hidden_states`` ``[B, T, D]`` (what the LM head reads) and
    ``head_context`` (the hypertoken rows each position scores), which :meth:`HyperModel.score` turns into
    logits for any slice of positions.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    head_context: HeadContext | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class HyperModel(nn.Module):
    """A causal LM over ``V + C`` ids: base tokens plus per-sequence hypertokens.

    Build it with :meth:`from_base` (a loaded model and its tokenizer) or
    :meth:`from_pretrained` (a saved hypervocab checkpoint).  Only the
    hyper-encoders (and LoRA adapters, see :meth:`add_lora`) are trainable.
    """

    base: PreTrainedModel | PeftModel  # peft's wrapper after add_lora, or loaded with adapters

    def __init__(self, base: PreTrainedModel | PeftModel, config: HyperConfig) -> None:
        super().__init__()
        if config.base_vocab_size is None or config.disabled_ids is None:
            raise ConfigError("the config is not bound to a tokenizer: build the model with HyperModel.from_base")
        self.config = config
        self.codec = config.codec()
        V, C, M = config.base_vocab_size, config.max_codebook_size, config.max_subtokens
        emb, head = base.get_input_embeddings(), base.get_output_embeddings()
        if isinstance(emb, HyperEmbedding) or isinstance(head, HyperHead):
            raise ConfigError("this base model is already wrapped by a HyperModel")
        if head is None or not hasattr(head, "weight"):
            raise ConfigError(f"{type(base).__name__} has no LM head: hypervocab needs a causal LM")
        rows = cast(torch.Tensor, emb.weight).shape[0]  # nn.Module types its attributes loosely
        if rows < V:
            raise ConfigError(f"the tokenizer has {V} ids but the model's embedding has only {rows} rows: "
                              f"tokenizer and model do not match")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        base.set_input_embeddings(HyperEmbedding(emb, V))
        base.set_output_embeddings((HyperHead if config.score_next_id else _InstalledRowsHead)(head, V, C))
        weight = cast(torch.Tensor, emb.weight)
        kw = encoder_options(config)
        self.input_encoder = build_encoder(config.encoder, weight.shape[1], M, **kw).to(weight.device, weight.dtype)
        self.output_encoder = (self.input_encoder if config.tie_encoders else
                               build_encoder(config.encoder, head.weight.shape[1], M, **kw).to(weight.device,
                                                                                                weight.dtype))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(cls, base: PreTrainedModel | PeftModel, tokenizer: Any,
                  config: HyperConfig | None = None) -> HyperModel:
        """Wrap a loaded causal LM; ``V``, the disabled ids and the pad id come from ``tokenizer``."""
        return cls(base, bind_config(config or HyperConfig(), tokenizer, base))

    @property
    def embedding(self) -> HyperEmbedding:
        return cast(HyperEmbedding, self.base.get_input_embeddings())  # installed by __init__

    @property
    def head(self) -> HyperHead:
        return self.base.get_output_embeddings()

    @contextmanager
    def tables(self, table: torch.Tensor | None, context: HeadContext | None) -> Iterator[HyperHead]:
        """Inside the block the wrapped layers read this call's hypertoken tables: the embedding ``table``
        ``[B, W, D]`` (input vectors of ids ``>= V``) and the head ``context`` (output vectors, the rows each
        position scores).  The one way a forward hands them over, as PEFT hands per-call state to its layers:
        the previous ones come back after the block, so a call inside another's (scoring during a forward)
        leaves the outer one's tables in place.  Yields the head (its ``context.hidden`` holds the hidden states
        when ``context.capture``)."""
        emb, head = self.embedding, self.head
        saved = emb.table, head.context
        emb.table, head.context = table, context
        try:
            yield head
        finally:
            emb.table, head.context = saved

    def forward_cached(self, codes: torch.Tensor, *, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       cache: Any, table: torch.Tensor, context: HeadContext, logits_to_keep: int = 0) -> Any:
        """The incremental forward of a session: ``[B, t]`` codes after what ``cache`` holds.

        ``attention_mask`` ``[B, past + t]`` (or as long as a static cache), ``position_ids`` ``[B, t]``,
        ``table`` / ``context`` as for :meth:`tables` (the context's rows for these ``t`` positions, or its last
        ``logits_to_keep``).  Returns the base model's output: ``logits`` ``[B, keep, V + C]`` and the cache.
        """
        from .kv_cache import cache_argument

        with self.tables(table, context):
            return self.base(input_ids=codes, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=logits_to_keep, **{cache_argument(): cache})

    def add_lora(self, lora_config: Any) -> HyperModel:
        """Put LoRA adapters (a ``peft.LoraConfig``) on the frozen base model; they are saved with our weights."""
        try:
            from peft import get_peft_model
        except ImportError:
            raise ImportError("LoRA needs peft: pip install 'hypervocab[model]'") from None
        self.base = get_peft_model(self.base, lora_config)
        return self

    def _has_lora(self) -> bool:
        return hasattr(self.base, "peft_config") and hasattr(self.base, "disable_adapter")

    @property
    def adapter_merged(self) -> bool:
        """Whether the LoRA weights are folded into the base weights (see :meth:`merge_adapter`)."""
        from_layers = (getattr(m, "merged", False) for m in self.base.modules() if hasattr(m, "lora_A"))
        return self._has_lora() and any(from_layers)

    def merge_adapter(self) -> HyperModel:
        """Fold LoRA into the base weights (``W + scale * B @ A``) for inference; :meth:`unmerge_adapter` undoes it.

        The outputs stay the same up to float rounding, but every adapted layer runs one matmul instead of
        three, which on CPU makes decoding about as fast as the base model's (measured by
        ``hypervocab eval speed``).  Training needs the adapter unmerged.  Nothing to do without LoRA.
        """
        if self._has_lora() and not self.adapter_merged:
            cast("PeftModel", self.base).merge_adapter()
        return self

    def unmerge_adapter(self) -> HyperModel:
        """Take the LoRA weights back out of the base weights (after :meth:`merge_adapter`)."""
        if self.adapter_merged:  # so peft wraps the base
            cast("PeftModel", self.base).unmerge_adapter()
        return self

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block ``self.base`` is the plain base model: LoRA off (nothing to do without LoRA).

        ``self.base`` then reads and scores base ids exactly like the original model, which is what the
        comparisons against the base model (bits per byte, speed) run.  A merged adapter is unmerged for
        the block and merged again after it.
        """
        if not self._has_lora():
            yield
            return
        merged = self.adapter_merged
        self.unmerge_adapter()
        trainable = {id(p): p.requires_grad for p in self.base.parameters()}
        try:
            with cast("PeftModel", self.base).disable_adapter():
                yield
        finally:
            # re-enabling an adapter makes its weights trainable again: keep what the caller had
            for p in self.base.parameters():
                p.requires_grad_(trainable[id(p)])
            if merged:
                self.merge_adapter()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ hypertoken tables

    def _slot_ids(self, phrases: torch.Tensor) -> torch.Tensor:
        """Padding slots (-1) read the pad token: masked out by most encoders, averaged in by ``encoder_pool="all"``."""
        return phrases.clamp(min=0) if self.config.pad_id is None else phrases.masked_fill(phrases < 0,
                                                                                          self.config.pad_id)

    def encode_inputs(self, phrases: torch.Tensor) -> torch.Tensor:
        """Input vectors of hypertokens: ``phrases`` [N, M] (padded with -1) -> [N, D]."""
        # through the base embedding module, so models that scale embeddings (Gemma) get the same scale
        return self.input_encoder(self.embedding.base(self._slot_ids(phrases)), phrases >= 0)

    def encode_outputs(self, phrases: torch.Tensor) -> torch.Tensor:
        """Output (unembedding) vectors of hypertokens: ``phrases`` [N, M] (padded with -1) -> [N, D]."""
        return self.output_encoder(F.embedding(self._slot_ids(phrases), self.head.weight), phrases >= 0)

    def encode_entries(self, phrases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output vectors of hypertokens: ``phrases`` [N, M] (padded with -1) -> two [N, D]."""
        return self.encode_inputs(phrases), self.encode_outputs(phrases)

    def _tables(self, prep: PreparedCodebooks, B: int, width: int,
                old: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output tables ``[B, width, D]``: ``old`` rows kept, the entries of ``prep`` encoded."""
        device = prep.visible.device
        D_in = self.embedding.weight.shape[1]
        D_out = self.head.weight.shape[1]
        dtype = self.embedding.weight.dtype
        tin = torch.zeros(B, width, D_in, device=device, dtype=dtype)
        tout = torch.zeros(B, width, D_out, device=device, dtype=dtype)
        if old is not None and old[0].shape[1]:
            w = old[0].shape[1]
            tin = torch.cat([old[0], tin[:, w:]], 1)
            tout = torch.cat([old[1], tout[:, w:]], 1)
        if prep.phrases.shape[0]:
            vin, vout = self.encode_entries(prep.phrases)
            idx = (prep.entry_row, prep.entry_slot)
            tin = tin.index_put(idx, vin.to(dtype))
            tout = tout.index_put(idx, vout.to(dtype))
        return tin, tout

    def _candidate_vectors(self, prep: PreparedCodebooks) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``[B, T, D]`` output vectors of the new id that may follow each position, and ``[B, T]`` where one may.

        Only the output side scores a candidate, and many positions share one: each phrase is encoded once.
        """
        if not prep.candidates.shape[0]:
            return None, None
        vout = self.encode_outputs(prep.candidates)
        index = prep.candidate_index
        return vout[index.clamp(min=0)], index >= 0

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        codebooks: CodebookBatch | PreparedCodebooks | None = None,
        compute_logits: bool = True,
        **kwargs: Any,
    ) -> HyperOutput:
        """Run the model on whole sequences of compressed ids (training, scoring).

        Args:
            input_ids: ``[B, T]`` codes (from :class:`~hypervocab.HyperTokenizer`), left padding allowed.
            attention_mask: ``[B, T]``; 0 marks padding.
            position_ids: ``[B, T]``; computed from ``config.position_mode`` when omitted.
            labels: ``[B, T]`` target codes (usually ``input_ids``), shifted inside; padding and ``-100``
                are ignored.
            codebooks: the batch's :class:`~hypervocab.codebook.CodebookBatch`, if the data pipeline made it,
                or its :class:`~hypervocab.codebook.PreparedCodebooks`: then nothing in the call waits for
                the host (the training path on a GPU).
            compute_logits: ``False`` skips the ``[B, T, V + C]`` logits: the output holds the hidden states
                and head context instead, and the loss (with ``labels``) is computed a chunk of positions at
                a time, never holding all the logits.

        Returns:
            :class:`HyperOutput`: ``logits`` ``[B, T, V + C]`` (rows not installed at a position are
            ``-inf``), ``loss`` when ``labels`` are given.
        """
        if isinstance(codebooks, PreparedCodebooks):
            # the codes were checked when these codebooks were traced from them: nothing to read back here
            B, T = self._check_shape(input_ids)
            if codebooks.shape != (B, T):
                raise InputTypeError(f"codebooks are prepared for {codebooks.shape} codes, input_ids are {(B, T)}")
            prep = codebooks.to(input_ids.device, non_blocking=True)
        else:
            ids = self.check_codes(input_ids)
            B, T = ids.shape
            cb = codebooks if codebooks is not None else CodebookBatch.from_codes(self.codec, ids)
            prep = PreparedCodebooks.from_batch(cb, max_codebook_size=self.codec.max_codebook_size,
                                                exact=self.config.codebook_mask == "exact",
                                                score_next_id=self.config.score_next_id).to(input_ids.device)
        if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T)):
            raise InputTypeError(f"labels must be a tensor shaped like input_ids {(B, T)}, got "
                                 + (str(tuple(labels.shape)) if isinstance(labels, torch.Tensor)
                                    else type(labels).__name__))
        mask = attention_mask_of(attention_mask, B, T, input_ids.device)
        tin, tout = self._tables(prep, B, prep.width, None)
        cand, cand_ok = self._candidate_vectors(prep) if self.config.codebook_mask == "exact" else (None, None)
        if position_ids is None:
            position_ids = compute_position_ids(prep.lengths, mask, self.config.position_mode)
        context = HeadContext(tout, prep.visible, cand, cand_ok)
        with self.tables(tin, replace(context, capture=not compute_logits)) as head:
            # always a mask: without one (and without a cache) transformers reads the gaps of "base" positions
            # (a hypertoken advances them by its length) as the starts of packed sequences
            out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                            **kwargs)
            hidden = head.context.hidden if head.context is not None else None
        if compute_logits:
            loss = self._loss(out.logits, labels, mask) if labels is not None else None
            return HyperOutput(loss, out.logits)
        loss = None
        if labels is not None:
            targets = next_code_targets(labels, mask)
            assert hidden is not None  # the head kept it (capture)
            loss = train_scores(self, hidden, context, targets).loss / (targets != -100).sum().clamp(min=1)
        return HyperOutput(loss, None, hidden, context)

    def score(self, hidden: torch.Tensor, context: HeadContext | None) -> torch.Tensor:
        """Logits of hidden states, as the forward's would be.

        Args:
            hidden: ``[B, t, D]`` final hidden states (``HyperOutput.hidden_states``, or a slice of them).
            context: ``HyperOutput.head_context`` for those positions (:meth:`HeadContext.positions`), or
                ``None`` for the base vocabulary alone.

        Returns:
            ``[B, t, V + C]`` logits, or ``[B, t, V]`` without a context.
        """
        head = self.head
        if context is None:
            logits = head.base(hidden)[..., : self.codec.base_vocab_size]
        else:
            with self.tables(self.embedding.table, replace(context, capture=False)):
                logits = head(hidden)
        cap = getattr(self.base.config, "final_logit_softcapping", None)
        if cap:  # what models that soft-cap their logits (Gemma 2) do after the head; -inf stays -inf
            logits = torch.where(torch.isfinite(logits), torch.tanh(logits / cap) * cap, logits)
        return logits

    @staticmethod
    def _check_shape(input_ids: Any) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise InputTypeError("input_ids must be a [batch, length] integer torch.Tensor, got "
                                 + (f"shape {tuple(input_ids.shape)} {input_ids.dtype}"
                                    if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__))
        return int(input_ids.shape[0]), int(input_ids.shape[1])

    def check_codes(self, input_ids: Any) -> np.ndarray:
        """``input_ids`` as a ``[B, T]`` int64 NumPy array, checked: a 2-D integer tensor of ids in ``[0, V + C)``.

        Raises:
            InputTypeError: not a ``[batch, length]`` integer tensor.
            InvalidCodeError: an id outside the id space (the message names its position).
        """
        self._check_shape(input_ids)
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        bad = (ids < 0) | (ids >= self.codec.vocab_size)
        if bad.any():
            b, t = (int(x) for x in np.argwhere(bad)[0])
            raise InvalidCodeError(f"input_ids[{b}][{t}] = {int(ids[b, t])} is outside the id space "
                                   f"[0, {self.codec.vocab_size}) (base_vocab_size {self.codec.base_vocab_size} + "
                                   f"max_codebook_size {self.codec.max_codebook_size})")
        return ids

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-code cross-entropy, in chunks of positions (no second [B, T, V + C] tensor).

        The targets are shifted, not the logits: a shifted view of the logits is not contiguous,
        and reshaping it would copy the largest tensor of the step (and its gradient) once more.
        """
        target = torch.full_like(labels, -100)
        target[:, :-1] = labels[:, 1:]
        target[:, :-1][mask[:, 1:] == 0] = -100
        flat = logits.reshape(-1, logits.shape[-1])  # a view: logits are contiguous
        flat_target = target.reshape(-1)
        total = logits.new_zeros((), dtype=torch.float32)
        for s in range(0, flat.shape[0], _LOSS_CHUNK):
            total = total + F.cross_entropy(flat[s: s + _LOSS_CHUNK].float(), flat_target[s: s + _LOSS_CHUNK],
                                            ignore_index=-100, reduction="sum")
        return total / (flat_target != -100).sum().clamp(min=1)

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **options: Any) -> Any:
        """Generate codes with a live vocabulary (each sequence's codebook grows as it writes).

        Args:
            input_ids: ``[B, T]`` codes from :class:`~hypervocab.HyperTokenizer` (left padding), or, with
                ``past=``, the codes of the next turn (:meth:`HyperTokenizer.encode_continuation`).
            attention_mask: ``[B, T]``, 0 marks padding.

        Keyword Args:
            past: a previous :class:`~hypervocab.generation.GenerationOutput` (or its ``state``): continue
                those sequences without reading them again.
            options: a :class:`~hypervocab.generation.GenerationOptions` (default: its defaults).  Each of
                its fields (max_new_tokens, max_new_base_tokens, do_sample, temperature, top_k, top_p,
                repetition_penalty, eos_token_id, stop_strings, allow_hypertokens, seed, logit_bias,
                prompt_lookup_num_tokens, max_matching_ngram_size) may also be given here by name,
                overriding it; an unknown name is a :class:`~hypervocab.errors.ConfigError`.
            max_new_tokens: codes to emit at most (decoding steps; default 20).
            max_new_base_tokens: base tokens to produce at most; a hypertoken longer than what is left is
                never chosen, so the budget is exact.
            do_sample, temperature, top_k, top_p, repetition_penalty: as in Hugging Face ``generate``
                (the penalty applies to codes already read or written).
            seed / generator: make sampling reproducible (one or the other).
            eos_token_id: base id(s) that end a sequence (default: the base model's); ``[]`` for none.
            stop_strings, tokenizer: end a sequence once its new text contains one of the strings.
            logit_bias: base id -> a number added to its logit (with ``allow_hypertokens=False``).
            streamer: an object with ``put(ids)`` and ``end()`` (e.g. ``transformers.TextStreamer``), given the
                prompt's base ids, then each code's base ids; batch size 1 only.
            allow_hypertokens: ``False`` emits base ids only (the prompt may still hold hypertokens).
            return_dict_in_generate: return a :class:`~hypervocab.generation.GenerationOutput` (codes, base
                ids, per-sequence stats and the state to continue from) instead of a tensor.
            output_codebooks: also return each sequence's final codebook (implies the dict).
            output_logits: also return the raw scores of every step (implies the dict).  With
                ``max_new_tokens=0`` a call only reads ``input_ids``: stepping a text through the model one
                code at a time this way is teacher forcing with the KV cache.
            prompt_lookup_num_tokens: speculative decoding with up to this many draft codes per step
                (batch size 1): the latest earlier match of the last base tokens proposes what follows,
                encoded with the live codebook, and one forward checks it.  Greedy output is the same as
                without it; sampled output has the same distribution.  See :mod:`hypervocab.speculative`.
            max_matching_ngram_size: the longest run of last base tokens prompt lookup matches (default 3).
            cache_implementation: ``"dynamic"`` (default) or ``"static"``: a preallocated KV cache and
                fixed-shape tables (one sequence), so that the decode step is compiled into a CUDA graph on
                a GPU (see :mod:`hypervocab.static_cache`).  The output is the same.
            compile: compile the static decode step: ``True`` (inductor, CUDA graphs on a GPU), a
                ``torch.compile`` backend name, ``False`` (eager) or ``None`` (default: on a CUDA device).

        Returns:
            ``[B, T + n]`` codes (the input, then the new codes padded on the right with the pad id), or a
            :class:`~hypervocab.generation.GenerationOutput`.
        """
        return generate(self, input_ids, attention_mask, **options)

    def new_session(self, batch_size: int, *, max_length: int | None = None,
                    compiled: bool | str | None = None) -> HyperSession:
        """A :class:`~hypervocab.session.HyperSession` of ``batch_size`` empty sequences, read and written by code.

        ``max_length`` makes a static session (one sequence, a preallocated cache of that many codes, a decode
        step that ``compiled`` into a CUDA graph; default: compiled on a CUDA device).

        >>> session = model.new_session(1)                                # doctest: +SKIP
        >>> logits, _, _ = session.feed(codes, mask)   # read a prompt: [1, V + C] next-code logits
        >>> expansions, logits = session.step([int(logits.argmax())])    # write one code, read it
        """
        return HyperSession.start(self, batch_size, max_length=max_length, compiled=compiled)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save only what hypervocab adds: the config, the encoders and LoRA adapters (never the base weights).

        state_dict: this model's weights by parameter name, when the module's own are not whole (FSDP
            shards gather them first); only the ``input_encoder.``/``output_encoder.`` entries and the LoRA
            entries under ``base.`` are read.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        names = ["input_encoder"] + ([] if self.config.tie_encoders else ["output_encoder"])
        if state_dict is None:
            tensors = {f"{n}.{k}": v for n in names for k, v in getattr(self, n).state_dict().items()}
        else:
            tensors = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in names}
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(directory / WEIGHTS_NAME),
                  metadata={"hypervocab_version": self.config.hypervocab_version})
        if hasattr(self.base, "peft_config"):
            if state_dict is None:
                self.base.save_pretrained(str(directory))
            else:
                self.base.save_pretrained(str(directory), state_dict={
                    k[len("base."):]: v for k, v in state_dict.items() if k.startswith("base.")})

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, base_model: PreTrainedModel | PeftModel | None = None,
                        **base_kwargs: Any) -> HyperModel:
        """Load a checkpoint made by :meth:`save_pretrained`, or one of the public zip2zip format.

        The base model is loaded from ``config.base_model_name_or_path`` (at the saved revision) unless
        ``base_model`` is given; ``base_kwargs`` go to ``AutoModelForCausalLM.from_pretrained``.  Only
        hypervocab's own format: :func:`hypervocab.load` also reads the public zip2zip one
        (:func:`hypervocab.interop.load_public_model`).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config = HyperConfig.from_pretrained(directory)
        if base_model is None:
            from transformers import AutoModelForCausalLM

            if not config.base_model_name_or_path:
                raise ConfigError(f"{CONFIG_NAME} names no base model: pass base_model=")
            if config.base_model_revision:
                base_kwargs.setdefault("revision", config.base_model_revision)
            base_model = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, **base_kwargs)
        if (directory / "adapter_config.json").is_file():
            from peft import PeftModel

            base_model = PeftModel.from_pretrained(base_model, str(directory))
        model = cls(base_model, config)
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise ConfigError(f"{str(directory)!r} holds no {WEIGHTS_NAME}: an incomplete hypervocab checkpoint")
        tensors = load_file(str(path))
        for name, module in (("input_encoder", model.input_encoder), ("output_encoder", model.output_encoder)):
            if name == "output_encoder" and config.tie_encoders:
                continue
            part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            try:
                module.load_state_dict(part, strict=True)
            except RuntimeError as e:
                raise ConfigError(f"the checkpoint's {name} does not fit this model "
                                  f"(saved by hypervocab {config.hypervocab_version}): {e}") from None
        return model


class _InstalledRowsHead(HyperHead):
    """A head that scores installed rows only, never the one new id that may legally come next.

    What ``score_next_id=False`` asks for: the public zip2zip runtime scores only the entries its
    codebook holds, so a converted checkpoint must not write an id that runtime never would.
    """

    scores_next_id = False

    def _hyper_logits(self, hidden: torch.Tensor, ctx: HeadContext) -> torch.Tensor:
        return super()._hyper_logits(hidden, replace(ctx, candidates=None, candidate_ok=None))
