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


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings in `folder` that a killed process left behind (a kill -9 during a write cannot
    clean up): those named by `_sibling_name` for a pid that is no longer running. Returns what was deleted."""
    import re

    removed = []
    folder = Path(folder)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        found = re.fullmatch(r"\..+\.(?:tmp|old|deleted)-(\d+)-[0-9a-f]{8}", path.name)
        if found is None or int(found.group(1)) == os.getpid() or pid_running(int(found.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _move_aside(path: Path, tag: str) -> Path:
    """Rename the directory `path` into a fresh hidden sibling, which is returned for deletion: nothing half-deleted is
    ever left under `path`'s name."""
    aside = fresh_sibling(path, tag)
    os.replace(path, aside / path.name)
    return aside


def replace_directory(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished directory `tmp` to `path`, replacing what was there."""
    tmp, path = Path(tmp), Path(os.path.abspath(path))  # "." has no name to build a sibling's from
    old = _move_aside(path, "old") if path.exists() else None
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_directory(path: str | os.PathLike) -> None:
    """Delete the directory `path`: renamed aside first, then removed."""
    shutil.rmtree(_move_aside(Path(path), "deleted"), ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`, on failure it is deleted and
    `path` is left as it was."""
    path = Path(os.path.abspath(path))  # "." or "a/..": a sibling of the directory itself, not one inside it
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
