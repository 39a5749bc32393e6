"""Position ids for compressed sequences (``position_mode`` in :class:`~hypervocab.HyperConfig`)."""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

__all__ = ["position_ids"]


def position_ids(lengths: np.ndarray, mask: np.ndarray, mode: str, *, base_offset: np.ndarray | None = None,
                 code_offset: np.ndarray | None = None) -> np.ndarray:
    """Positions of a ``[B, T]`` batch of codes.

    ``"base"``: a code sits at the base-stream index of its last base token, so
    RoPE distances match pretraining.  ``"compressed"``: one position per code.
    Padding (``mask == 0``) gets position 0 and does not advance the count.

    Args:
        lengths: ``[B, T]`` base tokens each code stands for.
        mask: ``[B, T]`` 1 for codes, 0 for padding.
        mode: ``"base"`` or ``"compressed"``.
        base_offset / code_offset: ``[B]`` base tokens / codes already seen (for cached steps).
    """
    if mode not in ("base", "compressed"):
        raise ConfigError(f"position mode must be 'base' or 'compressed', got {mode!r}")
    mask = np.asarray(mask).astype(np.int64)
    step = np.asarray(lengths, dtype=np.int64) * mask if mode == "base" else mask
    offset = base_offset if mode == "base" else code_offset
    pos = np.cumsum(step, axis=1) - 1
    if offset is not None:
        pos = pos + np.asarray(offset, dtype=np.int64)[:, None]
    return np.where(mask == 1, np.maximum(pos, 0), 0)
