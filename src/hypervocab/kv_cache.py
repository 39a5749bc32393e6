"""The KV caches a :class:`~hypervocab.session.HyperSession` uses, beyond what transformers gives.

* :func:`growing`: transformers' dynamic cache layers made to append in place (a buffer with room to
  spare) instead of concatenating a new tensor each step, which copies the whole cache.
* :func:`merged_cache`: several sessions' caches as one batch (rows that stopped at different steps,
  or requests joining the server's running batch), each padded on the right to the longest.
* :func:`cache_argument`: what the base model's forward calls its cache in this transformers version.

The static cache of a compiled decode step is :mod:`hypervocab.static_cache`.
"""

from __future__ import annotations

import functools
from dataclasses import fields
from typing import Any, cast

import numpy as np
import torch

__all__ = ["cache_argument", "growing", "growing_layer_class", "merged_cache"]


def merged_cache(caches: list[Any], order: np.ndarray, S: int) -> Any:
    """The parts' KV caches as one: each padded on the right to ``S`` (masked out), rows put back in ``order``."""
    from transformers import DynamicCache

    layer_lists = []
    for cache in caches:
        if isinstance(cache, list):
            layer_lists.append(cache)
        else:
            layer_lists.append([(layer.keys, layer.values) if getattr(layer, "keys", None) is not None
                                and layer.keys.numel() else None for layer in cache.layers])
    data = []
    o = torch.as_tensor(order)
    for li in range(len(layer_lists[0])):
        ks, vs = [], []
        for layers in layer_lists:
            k, v = layers[li]
            n = S - k.shape[2]  # the longest mask is at least as long as any layer's cache
            if n > 0:
                k = torch.cat([k, k.new_zeros(k.shape[:2] + (n,) + k.shape[3:])], 2)
                v = torch.cat([v, v.new_zeros(v.shape[:2] + (n,) + v.shape[3:])], 2)
            ks.append(k)
            vs.append(v)
        data.append((torch.cat(ks)[o], torch.cat(vs)[o]))
    return growing(DynamicCache(data))


def growing(cache: Any) -> Any:
    """``cache`` with its plain dynamic layers appending in place (:func:`growing_layer_class`)."""
    from transformers.cache_utils import DynamicLayer

    cls = growing_layer_class()
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = cls  # same state, one method more: see growing_layer_class
    return cache


@functools.cache
def growing_layer_class() -> type:
    """A transformers ``DynamicLayer`` whose keys and values live in a buffer with room to spare.

    A plain dynamic layer concatenates a new tensor at every step, copying the whole cache: for a batch
    of 16 rows with 500 positions that is hundreds of megabytes a step on a 30-layer model.  This one
    writes the new positions in place and hands out views; the buffer grows by a quarter (at least 64
    positions) when full, so appending costs what it appends.  Anything that replaces ``keys`` with a
    tensor of its own (narrowing the batch, dropping columns) is noticed, and the next append copies it
    into a new buffer; cropping keeps a view of the buffer, and the next append overwrites what it cut.
    """
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            kbuf: torch.Tensor | None = getattr(self, "_kbuf", None)
            keys = cast(torch.Tensor, self.keys)  # an empty 1-D tensor before the first append
            n, t = (keys.shape[-2] if keys.dim() == 4 else 0), key_states.shape[-2]
            if (kbuf is None or keys.dim() != 4 or keys.data_ptr() != kbuf.data_ptr() or keys.stride() != kbuf.stride()
                    or n + t > kbuf.shape[-2] or kbuf.shape[:2] != key_states.shape[:2]):
                cap = n + t + max(64, (n + t) // 4)
                kbuf = key_states.new_empty(key_states.shape[:2] + (cap,) + key_states.shape[3:])
                vbuf = value_states.new_empty(value_states.shape[:2] + (cap,) + value_states.shape[3:])
                if n:
                    kbuf[:, :, :n], vbuf[:, :, :n] = keys, cast(torch.Tensor, self.values)
                self._kbuf, self._vbuf = kbuf, vbuf
            vbuf = self._vbuf
            kbuf[:, :, n: n + t] = key_states
            vbuf[:, :, n: n + t] = value_states
            self.keys, self.values = kbuf[:, :, : n + t], vbuf[:, :, : n + t]
            return self.keys, self.values

    return GrowingLayer


@functools.cache
def cache_argument() -> str:
    """The name the base model's forward gives its KV cache: ``cache`` in recent transformers (which warn
    about the older ``past_key_values``), ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
