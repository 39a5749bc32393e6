"""Serving: an OpenAI-compatible HTTP server (``hypervocab serve``) with a live playground."""

from .app import ServeLimits, create_app

__all__ = ["ServeLimits", "create_app"]
