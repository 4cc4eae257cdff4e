"""Writes that never leave a half-written file or directory under its final name.

Everything is first written to a hidden temporary sibling (same filesystem), then renamed into place with
`os.replace`, which is atomic. A directory cannot be renamed over a non-empty one, so an existing directory is moved
aside first and deleted after the rename. Temporary siblings are created with the usual umask (not mkstemp/mkdtemp's
0600/0700), so what lands has the permissions a plain write would give it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _sibling_name(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fresh_sibling(path: str | os.PathLike, tag: str) -> Path:
    """A new empty directory next to `path` (hidden, unique)."""
    sibling = _sibling_name(Path(path), tag)
    sibling.mkdir()
    return sibling


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing ("w" or "wb"); on success it replaces `path`, on failure it is
    removed and `path` is left as it was."""
    path = Path(path)
    tmp = _sibling_name(path, "tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_directory(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished directory `tmp` to `path`, replacing what was there."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = fresh_sibling(path, "old")
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`, on failure it is deleted and
    `path` is left as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_sibling(path, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)
