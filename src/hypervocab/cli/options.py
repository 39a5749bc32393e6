"""Flags that several commands share: where the model runs and in which precision."""

from __future__ import annotations

import argparse

from ..loading import DTYPES

__all__ = ["add_device_options"]


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, read by :func:`hypervocab.load` (``args.device``, ``args.dtype``)."""
    parser.add_argument("--device", default="auto", help="where the model runs: 'auto' (default: CUDA when "
                        "available, else the CPU), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="model dtype (default 'auto': "
                        "bfloat16 on a GPU that has it, else float32)")
