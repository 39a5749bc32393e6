"""Position ids for compressed sequences (``position_mode`` in :class:`~hypervocab.HyperConfig`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast, overload

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:  # for annotations only: this module works on NumPy arrays without importing torch
    import torch

__all__ = ["position_ids"]


@overload
def position_ids(lengths: np.ndarray, mask: np.ndarray, mode: str, *, base_offset: np.ndarray | None = None,
                 code_offset: np.ndarray | None = None) -> np.ndarray: ...


@overload
def position_ids(lengths: torch.Tensor, mask: torch.Tensor, mode: str, *, base_offset: torch.Tensor | None = None,
                 code_offset: torch.Tensor | None = None) -> torch.Tensor: ...


def position_ids(lengths: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, mode: str, *,
                 base_offset: np.ndarray | torch.Tensor | None = None,
                 code_offset: np.ndarray | torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
    """Positions of a ``[B, T]`` batch of codes.

    ``"base"``: a code sits at the base-stream index of its last base token, so
    RoPE distances match pretraining.  ``"compressed"``: one position per code.
    Padding (``mask == 0``) gets position 0 and does not advance the count.

    Args:
        lengths: ``[B, T]`` base tokens each code stands for.
        mask: ``[B, T]`` 1 for codes, 0 for padding.
        mode: ``"base"`` or ``"compressed"``.
        base_offset / code_offset: ``[B]`` base tokens / codes already seen (for cached steps).

    NumPy arrays in give a NumPy array; torch tensors in (offsets too) give a tensor on their device.
    """
    if mode not in ("base", "compressed"):
        raise ConfigError(f"position mode must be 'base' or 'compressed', got {mode!r}")
    offset = base_offset if mode == "base" else code_offset
    if type(lengths).__module__.partition(".")[0] == "torch":  # on the tensors' device: no copy to the host
        mask = cast("torch.Tensor", mask).long()  # tensors in (see the overloads): the mask is one too
        lengths = cast("torch.Tensor", lengths).long()
    else:
        mask = np.asarray(mask).astype(np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        offset = None if offset is None else np.asarray(offset, dtype=np.int64)
    step = lengths * mask if mode == "base" else mask
    pos = step.cumsum(1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return pos.clip(min=0) * mask
