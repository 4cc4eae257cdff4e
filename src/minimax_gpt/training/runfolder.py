"""A run folder belongs to one run: one writer at a time, and no run silently reuses another's folder.

    with claim(out_dir, continuing=True):      # train --resume: this folder's own run goes on
        ...
    with claim(out_dir, overwrite=True):       # a fresh run where a run was: the old one is moved aside first

`out_dir/run.lock` holds {"pid", "host", "folder", "started"} while a run trains in the folder (created with O_EXCL,
removed at the end). A second claim fails with one line naming the other process. A lock is stale, and is taken over
with a log line, when its process is gone (same host, no such pid, or a pid whose start time differs: reused) or when
it was written for another folder (the run folder was copied while it trained). A lock from another host cannot be
checked: the message says how to remove it.

A folder "holds a run" when it has checkpoints, metrics.jsonl or summary.json. A fresh run (no --resume) into it is
refused unless `overwrite`, which renames the whole folder to a sibling `<name>.old-<time>` (never deletes) and says so.
Once the folder is claimed, temporaries that a killed process left in it (a checkpoint being written at a kill -9)
are deleted, with a log line each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from minimax_gpt.atomic import pid_running, remove_stale_temporaries

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
RUN_MARKERS = ("checkpoints", "metrics.jsonl", "summary.json")


class RunFolderError(ValueError):
    """The run folder is in use by another process, or holds a run that this command would overwrite."""


def run_files(out_dir: str | os.PathLike) -> list[str]:
    """The names in `out_dir` that show it holds a run (empty when it does not)."""
    return [name for name in RUN_MARKERS if (Path(out_dir) / name).exists()]


def run_folder_of(checkpoint: str | os.PathLike) -> Path | None:
    """The run folder a checkpoint `<run>/checkpoints/step-N` belongs to; None for a checkpoint outside one."""
    path = Path(checkpoint).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


@contextlib.contextmanager
def claim(out_dir: str | os.PathLike, continuing: bool = False, overwrite: bool = False,
          enabled: bool = True) -> Iterator[Path | None]:
    """Hold `out_dir/run.lock` for the block; yields the folder an old run was moved to (or None). `continuing`:
    the folder's own run is being resumed. `enabled=False` (ranks > 0) does nothing."""
    if not enabled:
        yield None
        return
    out_dir = Path(out_dir)
    _check_lock(out_dir)  # before moving anything: a live run is never moved aside
    moved = None
    found = run_files(out_dir)
    if found and not continuing:
        if not overwrite:
            raise RunFolderError(
                f"{out_dir} already holds a run ({', '.join(found)}); continue it with --resume {out_dir}, train "
                f"into another folder with --out, or pass --overwrite to move the old run aside")
        moved = _move_aside(out_dir)
        logger.warning("--overwrite: moved the previous run in %s to %s (nothing was deleted)", out_dir, moved)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _acquire(out_dir)
    for folder in (out_dir, out_dir / "checkpoints"):
        for path in remove_stale_temporaries(folder):
            logger.warning("removed %s, left by a process that was killed while writing it", path)
    try:
        yield moved
    finally:
        _release(lock)


def _move_aside(out_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{n}")
    os.rename(out_dir, target)
    return target


def _identity() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not pid_running(pid):
        return False
    started = _start_time(pid)
    return holder.get("start") is None or started is None or started == holder["start"]


def _check_lock(out_dir: Path) -> None:
    """Raise when a live process holds the folder's lock; remove a stale lock (saying why)."""
    path = out_dir / LOCK_NAME
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:  # released meanwhile
        return
    if not holder and age < 10:  # another process is writing it right now
        raise RunFolderError(f"{out_dir} is being claimed by another run (its {LOCK_NAME} is being written); "
                             f"try again in a moment or train into another folder with --out")
    here = str(out_dir.resolve())
    if holder.get("host") != socket.gethostname() and holder.get("folder") == here:
        raise RunFolderError(
            f"{out_dir} is in use by pid {holder.get('pid')} on host {holder.get('host')} (since "
            f"{holder.get('started', '?')}), which cannot be checked from here; if that run is over, delete {path}")
    if holder.get("folder") == here and _alive(holder):
        raise RunFolderError(
            f"{out_dir} is in use by another run: pid {holder['pid']} on {holder['host']} (since "
            f"{holder.get('started', '?')}); wait for it to finish, stop it, or train into another folder with --out")
    why = ("its process is gone" if holder.get("folder") == here else
           "it was written for another folder (this run folder was copied)" if holder else "it is unreadable")
    logger.warning("taking over the stale lock %s: %s", path, why)
    path.unlink(missing_ok=True)


def _acquire(out_dir: Path) -> Path:
    path = out_dir / LOCK_NAME
    record = {**_identity(), "folder": str(out_dir.resolve()), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another process claimed it since _check_lock
        _check_lock(out_dir)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record) + "\n")
    return path


def _release(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
