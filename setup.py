"""Builds the compiled core (everything else is in pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hypervocab._lzw",
            sources=["src/hypervocab/_lzw.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-unused-parameter"],
        )
    ]
)
