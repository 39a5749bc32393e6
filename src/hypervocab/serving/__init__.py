"""Serving: an OpenAI-compatible HTTP server (``hypervocab serve``) with a live playground."""

from .app import LOOPBACK_HOSTS, ServeLimits, create_app

__all__ = ["LOOPBACK_HOSTS", "ServeLimits", "create_app"]
