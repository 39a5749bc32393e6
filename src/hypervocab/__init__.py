"""hypervocab: an inference-time adaptive vocabulary for Hugging Face causal language models.

An online LZW compressor merges recurring runs of tokens of the current context
into hypertokens (see :class:`LZWCodec`).  Importing this package is light: it
needs NumPy only; model and tokenizer support import their extras when used.
"""

from __future__ import annotations

from . import errors
from .codebook import Codebook, Entry
from .codec import Decoded, DecoderState, EncodedBatch, LZWCodec, Window
from .config import HyperConfig
from .errors import ConfigError, HypervocabError, InvalidCodeError, InvalidTokenError, StateError
from .streaming import HyperTextStreamer, IncrementalDetokenizer
from .tokenizer import HyperTokenizer
from .version import __version__


def __getattr__(name: str):
    # the model needs torch: import it only when asked for, so `import hypervocab` stays light
    if name in ("HyperModel", "HyperOutput"):
        from . import model

        return getattr(model, name)
    if name in ("GenerationOptions", "GenerationOutput", "SequenceStats"):
        from . import generation

        return getattr(generation, name)
    if name == "HyperSession":
        from . import session

        return session.HyperSession
    if name == "load":
        from . import loading

        return loading.load
    raise AttributeError(f"module 'hypervocab' has no attribute {name!r}")

__all__ = [
    "__version__",
    "load",
    "errors",
    "HyperConfig",
    "HyperModel",
    "HyperTokenizer",
    "HyperSession",
    "GenerationOptions",
    "GenerationOutput",
    "HyperTextStreamer",
    "IncrementalDetokenizer",
    "SequenceStats",
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
    "StateError",
]
