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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .codebook import CodebookBatch, PreparedCodebooks, next_candidates
from .codec import DecoderState
from .config import CONFIG_NAME, HyperConfig, bind_config
from .embedding import HeadContext, HyperEmbedding, HyperHead
from .errors import ConfigError, InputTypeError, InvalidCodeError
from .hyper_encoder import build_encoder, encoder_options
from .positions import position_ids as compute_position_ids

__all__ = ["HyperModel", "HyperOutput", "HyperState", "WEIGHTS_NAME"]

WEIGHTS_NAME = "hypervocab_encoders.safetensors"
_LOSS_CHUNK = 1024  # positions per cross-entropy chunk


@dataclass
class HyperState:
    """What a cached call carries over, per sequence: decoder states, hypertoken tables, counters.

    in_table / out_table: ``[B, W, D]`` input and output vectors of ids ``V .. V + W - 1``.
    base_len / code_len: ``[B]`` base tokens / codes read so far (padding excluded).
    attention_mask: ``[B, S]`` every position seen so far.
    """

    decoders: list[DecoderState]
    in_table: torch.Tensor
    out_table: torch.Tensor
    base_len: np.ndarray
    code_len: np.ndarray
    attention_mask: torch.Tensor


@dataclass
class HyperOutput:
    """loss (scalar or ``None``), logits ``[B, T, V + C]``, the base model's cache and our :class:`HyperState`.

    With ``compute_logits=False``: no logits; ``hidden_states`` ``[B, T, D]`` (what the LM head reads) and
    ``head_context`` (the hypertoken rows each position scores), which :meth:`HyperModel.score` turns into
    logits for any slice of positions.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hyper_state: HyperState | None = None
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

    def __init__(self, base: nn.Module, config: HyperConfig) -> None:
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
        rows = emb.weight.shape[0]
        if V > rows:
            raise ConfigError(f"the tokenizer has {V} ids but the model's embedding has only {rows} rows: "
                              f"tokenizer and model do not match")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        base.set_input_embeddings(HyperEmbedding(emb, V))
        base.set_output_embeddings((HyperHead if config.score_next_id else _InstalledRowsHead)(head, V, C))
        weight = emb.weight
        kw = encoder_options(config)
        self.input_encoder = build_encoder(config.encoder, weight.shape[1], M, **kw).to(weight.device, weight.dtype)
        self.output_encoder = (self.input_encoder if config.tie_encoders else
                               build_encoder(config.encoder, head.weight.shape[1], M, **kw).to(weight.device,
                                                                                                weight.dtype))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(cls, base: nn.Module, tokenizer: Any, config: HyperConfig | None = None) -> HyperModel:
        """Wrap a loaded causal LM; ``V``, the disabled ids and the pad id come from ``tokenizer``."""
        return cls(base, bind_config(config or HyperConfig(), tokenizer, base))

    @property
    def embedding(self) -> HyperEmbedding:
        return self.base.get_input_embeddings()

    @property
    def head(self) -> HyperHead:
        return self.base.get_output_embeddings()

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
            self.base.merge_adapter()
        return self

    def unmerge_adapter(self) -> HyperModel:
        """Take the LoRA weights back out of the base weights (after :meth:`merge_adapter`)."""
        if self.adapter_merged:
            self.base.unmerge_adapter()
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
            with self.base.disable_adapter():
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
        return self.output_encoder(F.embedding(self._slot_ids(phrases), self.head.base.weight), phrases >= 0)

    def encode_entries(self, phrases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output vectors of hypertokens: ``phrases`` [N, M] (padded with -1) -> two [N, D]."""
        return self.encode_inputs(phrases), self.encode_outputs(phrases)

    def _tables(self, prep: PreparedCodebooks, B: int, width: int,
                old: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output tables ``[B, width, D]``: ``old`` rows kept, the entries of ``prep`` encoded."""
        device = prep.visible.device
        D_in = self.embedding.base.weight.shape[1]
        D_out = self.head.base.weight.shape[1]
        dtype = self.embedding.base.weight.dtype
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

    def _step_trace(self, state: HyperState, codes: np.ndarray, mask: np.ndarray) -> CodebookBatch:
        """Push new codes into the sequences' decoder states; the same facts as CodebookBatch.from_codes."""
        B, T = codes.shape
        V, C, M = self.codec.base_vocab_size, self.codec.max_codebook_size, self.codec.max_subtokens
        n_after = np.zeros((B, T), np.int64)
        pending = np.full((B, T, M), -1, np.int64)
        lengths = np.ones((B, T), np.int64)
        phrases, rows, slots = [], [], []
        # all or nothing: a bad code in one row must leave every row's state as it was
        if T == 1:  # the generation step: each code's validity is known up front
            for b, dec in enumerate(state.decoders):
                if mask[b, 0] and not dec.is_valid(int(codes[b, 0])):
                    self._raise_invalid(dec.copy(), codes[b], b, 0)
            snapshots = None
        else:
            snapshots = [dec.copy() for dec in state.decoders]
        for b, dec in enumerate(state.decoders):
            for t in range(T):
                if mask[b, t]:
                    try:
                        step = dec.push(int(codes[b, t]))
                    except InvalidCodeError:
                        state.decoders[:] = snapshots
                        self._raise_invalid(snapshots[b].copy(), codes[b], b, t, mask[b])
                    lengths[b, t] = len(step.ids)
                    for e in step.installed:
                        phrases.append(list(e.phrase) + [-1] * (M - len(e.phrase)))
                        rows.append(b)
                        slots.append(e.id - V)
                n_after[b, t] = len(dec)
                p = dec.pending
                pending[b, t, : len(p)] = p
        counts = np.array([len(d) for d in state.decoders], np.int64)
        return CodebookBatch(np.array(phrases, np.int64).reshape(-1, M), np.array(rows, np.int64),
                             np.array(slots, np.int64), counts, n_after, next_candidates(pending, n_after, C), lengths)

    @staticmethod
    def _raise_invalid(state: DecoderState, row: np.ndarray, b: int, t: int, mask: np.ndarray | None = None) -> None:
        """Raise the codec's explanation for ``row[t]``, read from ``state`` (a scratch copy) and named by position."""
        kept = [int(c) for c, m in zip(row[:t], mask[:t] if mask is not None else [1] * t) if m]
        try:
            state.push(kept + [int(row[t])])
        except InvalidCodeError as e:
            raise InvalidCodeError(f"input_ids[{b}][{t}]: {str(e).split(': ', 1)[1]}") from None

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        codebooks: CodebookBatch | None = None,
        past_key_values: Any = None,
        hyper_state: HyperState | None = None,
        use_cache: bool | None = None,
        compute_logits: bool = True,
        **kwargs: Any,
    ) -> HyperOutput:
        """Run the model on compressed ids.

        Args:
            input_ids: ``[B, T]`` codes (from :class:`~hypervocab.HyperTokenizer`), left padding allowed.
            attention_mask: ``[B, T]`` (or ``[B, past + T]`` in a cached call); 0 marks padding.
            position_ids: ``[B, T]``; computed from ``config.position_mode`` when omitted.
            labels: ``[B, T]`` target codes (usually ``input_ids``), shifted inside; padding and ``-100``
                are ignored.
            codebooks: the batch's :class:`~hypervocab.codebook.CodebookBatch`, if the data pipeline made it,
                or its :class:`~hypervocab.codebook.PreparedCodebooks`: then nothing in the call waits for
                the host (the training path on a GPU).
            past_key_values / hyper_state: continue a cached call (pass both from the previous output).
            use_cache: return the cache and a :class:`HyperState` to continue from.
            compute_logits: ``False`` skips the ``[B, T, V + C]`` logits: the output holds the hidden states
                and head context instead, and the loss (with ``labels``) is computed a chunk of positions at
                a time, never holding all the logits.

        Returns:
            :class:`HyperOutput`: ``logits`` ``[B, T, V + C]`` (rows not installed at a position are
            ``-inf``), ``loss`` when ``labels`` are given.
        """
        cached = hyper_state is not None
        prepared = isinstance(codebooks, PreparedCodebooks)
        if prepared:
            # the codes were checked when these codebooks were traced from them: nothing to read back here
            B, T = self._check_shape(input_ids)
            if codebooks.shape != (B, T) or cached:
                raise InputTypeError(f"codebooks are prepared for {codebooks.shape} codes, input_ids are "
                                     f"{(B, T)}" if not cached else
                                     "prepared codebooks cannot continue a cached call (hyper_state)")
            ids = None
        else:
            ids = self._check_ids(input_ids)
            B, T = ids.shape
        if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T)):
            raise InputTypeError(f"labels must be a tensor shaped like input_ids {(B, T)}, got "
                                 + (str(tuple(labels.shape)) if isinstance(labels, torch.Tensor)
                                    else type(labels).__name__))
        device = input_ids.device
        if past_key_values is not None and not cached:
            raise InputTypeError("past_key_values needs the hyper_state of the same previous call")
        mask = self._new_mask(attention_mask, hyper_state, B, T, device)
        C = self.codec.max_codebook_size
        exact = cached or self.config.codebook_mask == "exact"
        if prepared:
            prep = codebooks.to(device, non_blocking=True)
        else:
            mask_np = mask.cpu().numpy()
            cb = (self._step_trace(hyper_state, ids, mask_np) if cached else
                  codebooks if codebooks is not None else CodebookBatch.from_codes(self.codec, ids))
            prep = PreparedCodebooks.from_batch(cb, max_codebook_size=C, exact=exact,
                                                score_next_id=self.config.score_next_id).to(device)
        old = (hyper_state.in_table, hyper_state.out_table) if cached else None
        width = min(C, max(prep.width, 0 if old is None else old[0].shape[1]))
        tin, tout = self._tables(prep, B, width, old)
        cand, cand_ok = self._candidate_vectors(prep) if exact else (None, None)
        if position_ids is None:
            offsets = {} if not cached else {
                "base_offset": torch.as_tensor(hyper_state.base_len, device=device),
                "code_offset": torch.as_tensor(hyper_state.code_len, device=device)}
            position_ids = compute_position_ids(prep.lengths, mask, self.config.position_mode, **offsets)
        full_mask = mask if not cached else torch.cat([hyper_state.attention_mask, mask], 1)
        emb, head = self.embedding, self.head
        context = HeadContext(tout, prep.visible, cand, cand_ok)
        emb.table, head.context = tin, replace(context, capture=not compute_logits)
        try:
            # no mask given and nothing cached: every position is real, and the base model need not look
            # (its check of an all-ones mask would wait for the device)
            base_mask = None if attention_mask is None and not cached else full_mask
            out = self.base(input_ids=input_ids, attention_mask=base_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache, **kwargs)
            hidden = head.context.hidden
        finally:
            emb.table, head.context = None, None
        loss = logits = None
        if compute_logits:
            logits = out.logits
            if labels is not None:
                loss = self._loss(logits, labels, mask)
        elif labels is not None:
            from .loss import next_code_targets, score_chunks

            targets = next_code_targets(labels, mask)
            loss = score_chunks(self, hidden, context, targets).cross_entropy / (targets != -100).sum().clamp(min=1)
        state = None
        if use_cache:
            ids = ids if ids is not None else self._check_ids(input_ids)
            mask_np = mask.cpu().numpy()
            decoders = hyper_state.decoders if cached else self._decoders_from(ids)
            lengths = prep.lengths.cpu().numpy() * mask_np
            base_off = hyper_state.base_len if cached else 0
            code_off = hyper_state.code_len if cached else 0
            state = HyperState(decoders, tin.detach(), tout.detach(), base_off + lengths.sum(1),
                               code_off + mask_np.sum(1), full_mask)
        return HyperOutput(loss, logits, getattr(out, "past_key_values", None), state,
                           None if compute_logits else hidden, None if compute_logits else context)

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
            saved, head.context = head.context, replace(context, capture=False)
            try:
                logits = head(hidden)
            finally:
                head.context = saved
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
        return tuple(input_ids.shape)

    def _check_ids(self, input_ids: Any) -> np.ndarray:
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
    def _new_mask(attention_mask: Any, state: HyperState | None, B: int, T: int, device: torch.device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(B, T, dtype=torch.long, device=device)
        past = 0 if state is None else state.attention_mask.shape[1]
        if attention_mask.shape == (B, past + T):
            return attention_mask[:, past:].long()
        if attention_mask.shape == (B, T):
            return attention_mask.long()
        raise InputTypeError(f"attention_mask must be [B, T] = {(B, T)} or [B, past + T] = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")

    def _decoders_from(self, ids: np.ndarray) -> list[DecoderState]:
        decoders = []
        for row in ids:
            d = self.codec.decoder_state()
            d.push(row)
            decoders.append(d)
        return decoders

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
            max_new_tokens: codes to emit at most (decoding steps; default 20).
            max_new_base_tokens: base tokens to produce at most; a hypertoken longer than what is left is
                never chosen, so the budget is exact.
            do_sample, temperature, top_k, top_p, repetition_penalty: as in Hugging Face ``generate``
                (the penalty applies to codes already read or written).
            seed / generator: make sampling reproducible (one or the other).
            eos_token_id: base id(s) that end a sequence (default: the base model's); ``[]`` for none.
            stop_strings, tokenizer: end a sequence once its new text contains one of the strings.
            streamer: an object with ``put(ids)`` and ``end()`` (e.g. ``transformers.TextStreamer``), given the
                prompt's base ids, then each code's base ids; batch size 1 only.
            allow_hypertokens: ``False`` emits base ids only (the prompt may still hold hypertokens).
            return_dict_in_generate: return a :class:`~hypervocab.generation.GenerationOutput` (codes, base
                ids, per-sequence stats and the state to continue from) instead of a tensor.
            output_codebooks: also return each sequence's final codebook (implies the dict).
            output_logits: also return the raw scores of every step (implies the dict).  With
                ``max_new_tokens=0`` a call only reads ``input_ids``: stepping a text through the model one
                code at a time this way is teacher forcing with the KV cache.

        Returns:
            ``[B, T + n]`` codes (the input, then the new codes padded on the right with the pad id), or a
            :class:`~hypervocab.generation.GenerationOutput`.
        """
        from .generation import generate

        return generate(self, input_ids, attention_mask, **options)

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
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"hypervocab_version": self.config.hypervocab_version})
        if hasattr(self.base, "peft_config"):
            if state_dict is None:
                self.base.save_pretrained(str(directory))
            else:
                self.base.save_pretrained(str(directory), state_dict={
                    k[len("base."):]: v for k, v in state_dict.items() if k.startswith("base.")})

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, base_model: nn.Module | None = None,
                        **base_kwargs: Any) -> HyperModel:
        """Load a checkpoint made by :meth:`save_pretrained`, or one of the public zip2zip format.

        The base model is loaded from ``config.base_model_name_or_path`` (at the saved revision) unless
        ``base_model`` is given; ``base_kwargs`` go to ``AutoModelForCausalLM.from_pretrained``.  A folder
        with a ``zip2zip_config.json`` (and no ``hypervocab_config.json``) is read by
        :func:`hypervocab.interop.load_public_model`.
        """
        from safetensors.torch import load_file

        from .interop import is_public_checkpoint, load_public_model

        directory = Path(directory)
        if is_public_checkpoint(directory):  # a checkpoint of the public zip2zip runtime: converted on the fly
            return load_public_model(cls, directory, base_model=base_model, **base_kwargs)
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

    def _hyper_logits(self, hidden: torch.Tensor, ctx: HeadContext) -> torch.Tensor:
        return super()._hyper_logits(hidden, replace(ctx, candidates=None, candidate_ok=None))
