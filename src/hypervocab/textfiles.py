"""Folders of text files: which files a folder holds, and how one file is read as text.

Training data, evaluation and every other reader of a folder use these two rules, so the same
folder gives the same documents everywhere.

Listing (:func:`list_files`): a path that is a file is itself.  In a folder, a file is listed when
its path relative to the folder matches one of the glob patterns at any depth, as
:meth:`pathlib.Path.rglob` matches (``"*.py"`` and ``"**/*.py"`` both find the Python files of
subfolders; ``"docs/*.md"`` finds ``docs/a.md`` and ``x/docs/a.md``), and no part of that relative
path is hidden (starts with ``.``: ``.git``, ``.env``), is ``__pycache__`` or matches a glob of
``exclude``.  Symbolic links to folders are not followed.  The files come sorted by their relative
POSIX path, so every machine lists them in the same order.

Reading (:func:`read_text_file`): a file with a NUL byte in its first 8 KiB is binary; the rest is
decoded as UTF-8, strictly.  Binary and non-UTF-8 files read as ``None``: not text, skipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fnmatch import fnmatch, fnmatchcase
from pathlib import Path

from .errors import ConfigError

__all__ = ["BINARY_SNIFF_BYTES", "list_files", "read_text_file"]

#: how much of the start of a file is searched for a NUL byte, the mark of a binary file
BINARY_SNIFF_BYTES = 8192


def list_files(root: str | os.PathLike[str], patterns: str | Sequence[str] = ("*",),
               exclude: Sequence[str] = ()) -> list[Path]:
    """``root`` itself when it is a file, else the files under it that match any of ``patterns``.

    See the module docstring for the rule.  ``exclude`` holds globs of file or folder names
    (``"site-packages"``, ``"test_*"``).

    Raises:
        ConfigError: ``root`` is neither a file nor a folder, or a pattern is empty or absolute.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"path {str(root)!r} is neither a file nor a folder")
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    for p in patterns:
        if not p or p.startswith("/"):
            raise ConfigError(f"glob pattern {p!r} must be a non-empty path relative to the folder, such as '*.py'")
    # "**/" between parts and at the start: a pattern matches at any depth, as Path.rglob does
    split = [["**", *(part for part in p.split("/") if part and part != ".")] for p in patterns]

    def skipped(name: str) -> bool:
        return name.startswith(".") or name == "__pycache__" or any(fnmatch(name, x) for x in exclude)

    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):  # symlinked folders are listed in dirs but not entered
        dirs[:] = [d for d in dirs if not skipped(d)]
        rel = Path(folder).relative_to(root).parts
        for name in files:
            parts = (*rel, name)
            path = Path(folder, name)
            if not skipped(name) and any(_match(parts, pat) for pat in split) and path.is_file():
                found.append(("/".join(parts), path))
    return [path for _, path in sorted(found)]


def _match(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether path ``parts`` match glob ``pattern`` parts, where ``"**"`` stands for any number of folders."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def read_text_file(path: str | os.PathLike[str]) -> str | None:
    """The file's text, or ``None`` when it is not text (a NUL byte in its first 8 KiB, or not UTF-8)."""
    data = Path(path).read_bytes()
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
