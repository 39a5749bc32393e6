"""The static decode path: a preallocated KV cache and fixed-shape tables, so one step can be a CUDA graph.

On a GPU a small model's decode step is bound by Python and kernel launches, not by arithmetic:
SmolLM2-135M needs well under a millisecond of GPU work per token, yet an eager step takes tens of
milliseconds.  The cure is to record the step once and replay it (CUDA graphs, here through
``torch.compile(mode="reduce-overhead")``), which needs every tensor the step touches to keep its
shape and its address from one step to the next:

* the KV cache is a transformers ``StaticCache`` of ``max_length`` positions, written in place;
* the attention mask is that long too (0 past what was read);
* the hypertoken tables have all ``C = max_codebook_size`` rows from the start (rows not installed are
  never visible), so the embedding and the head see the same shapes at every step;
* the head's context (:class:`~hypervocab.embedding.HeadContext`) is one object whose tensors are
  updated in place: the visible count, the legal next id's output vector and whether it exists.

Nothing in the step reads a value back to the host.  The CPU path (a dynamic cache, tables that grow)
is unchanged; a session is static only when asked (``generate(..., cache_implementation="static")``).
The step compiles with ``fullgraph=True``: a graph break would fail loudly rather than quietly give up
the graph.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from .embedding import HeadContext
from .kv_cache import cache_argument

if TYPE_CHECKING:
    from .model import HyperModel

__all__ = ["StaticStep", "decode_function"]


def _decode(base: Any, codes: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            cache: Any, cache_name: str) -> torch.Tensor:
    """One forward of the base model over ``[B, 1]`` codes: ``[B, V + C]`` logits (tables set by the caller)."""
    out = base(input_ids=codes, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
               **{cache_name: cache})
    return out.logits[:, -1]


@functools.cache
def decode_function(compiled: bool, backend: str = "inductor") -> Any:
    """The decode step, eager or compiled (``reduce-overhead``: CUDA graphs on a GPU; one graph, no breaks)."""
    if not compiled:
        return _decode
    mode = "reduce-overhead" if backend == "inductor" else None
    return torch.compile(_decode, mode=mode, fullgraph=True, backend=backend)


class StaticStep:
    """The fixed buffers of a static session's decode step, and the step function.

    model: the :class:`~hypervocab.HyperModel`; batch_size; max_length: positions the cache holds;
    out_table / cand / cand_ok: the session's tables (full width, updated in place by the session);
    compiled: compile the step: ``True`` (inductor with CUDA graphs), the name of a ``torch.compile``
    backend (``"eager"`` traces the graph without generating code), or ``None``: on a CUDA device.
    """

    def __init__(self, model: HyperModel, batch_size: int, max_length: int, out_table: torch.Tensor, cand: torch.Tensor,
                 cand_ok: torch.Tensor, *, compiled: bool | str | None = None) -> None:
        from transformers import StaticCache

        device = out_table.device
        self.max_length = max_length
        self.cache = StaticCache(config=model.base.config, max_cache_len=max_length)
        self.visible = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        # one context object for every step, its tensors updated in place: the compiled step sees the same
        # objects (no recompilation) at the same addresses (a graph replays them)
        self.context = HeadContext(out_table, self.visible, cand[:, None], cand_ok[:, None])
        if compiled is None:
            compiled = device.type == "cuda"
        self.compiled = compiled is not False
        self.function = decode_function(self.compiled, compiled if isinstance(compiled, str) else "inductor")

    def __call__(self, model: HyperModel, codes: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 count: torch.Tensor, in_table: torch.Tensor) -> torch.Tensor:
        """``[B, 1]`` codes -> ``[B, V + C]`` logits; ``attention_mask`` ``[B, max_length]``, ``count`` ``[B]``."""
        self.visible.copy_(count[:, None])
        with model.tables(in_table, self.context):
            return self.function(model.base, codes, attention_mask, position_ids, self.cache, cache_argument())
