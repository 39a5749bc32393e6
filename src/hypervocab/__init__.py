"""hypervocab: an inference-time adaptive vocabulary for Hugging Face causal language models.

An online LZW compressor merges recurring runs of tokens of the current context
into hypertokens (see :class:`LZWCodec`).  Importing this package is light: it
needs NumPy only; model and tokenizer support import their extras when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors
from .codebook import Codebook, Entry
from .codec import Decoded, DecoderState, EncodedBatch, LZWCodec, Window
from .errors import ConfigError, HypervocabError, InvalidCodeError, InvalidTokenError

__all__ = [
    "__version__",
    "errors",
    "LZWCodec",
    "DecoderState",
    "Codebook",
    "Entry",
    "Decoded",
    "EncodedBatch",
    "Window",
    "HypervocabError",
    "ConfigError",
    "InvalidCodeError",
    "InvalidTokenError",
]
