"""Measurements of what hypervocab buys: compression now, model quality later."""

from .compression import CompressionRow, compression_report, format_markdown

__all__ = ["CompressionRow", "compression_report", "format_markdown"]
