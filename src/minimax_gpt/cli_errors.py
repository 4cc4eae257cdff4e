"""How a `minimax-gpt` command ends when it fails: one line, the same on one process and under torchrun.

    minimax-gpt <cmd>: error: <what, and how to fix it>        exit 2
    minimax-gpt <cmd>: interrupted                              exit 130 (Ctrl-C; training saves a checkpoint first)
    minimax-gpt <cmd>: stopped by SIGTERM                       exit 143

Any exception is reported this way, including torch's that derive from BaseException (CheckpointException); an
exception that is not one of the expected kinds (a bug, or a failure deep inside torch) is named by its type, with a
hint to rerun with `--debug` (or MINIMAX_GPT_DEBUG=1), which shows the traceback instead.

Under torchrun an error is often raised on one rank only, while the others wait in a collective; they fail too once
its process is gone (or when torchrun sends them SIGTERM). Each failing rank publishes its line in torchrun's
key-value store (the first one wins) and rank 0 prints that first line, so the cause appears once, from rank 0,
whichever rank hit it. Without a reachable store every rank prints its own line, prefixed with its rank.
"""

from __future__ import annotations

import os
import signal
import sys

DEBUG_ENV = "MINIMAX_GPT_DEBUG"
_STORE_KEY = "minimax_gpt/first_error"


class Terminated(BaseException):
    """SIGTERM arrived outside training (which handles it itself by saving and stopping)."""


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def raise_on_sigterm():
    """Make SIGTERM raise Terminated, so that the command ends with its one line; returns the previous handler to
    put back (None outside the main thread, where Python cannot install handlers)."""
    def handler(signum, frame):
        raise Terminated()

    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def message(exc: BaseException) -> str:
    """The text after "error: " for an exception: its message for the kinds the library raises on bad input or a
    bad file (ValueError, TypeError, OSError, TrainingDiverged), else its type and message with a hint."""
    from minimax_gpt.training.faults import TrainingDiverged

    failures = getattr(exc, "failures", None)  # torch's CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))[0]
    text = " ".join(str(exc).split()) or "no message"
    if isinstance(exc, (ValueError, TypeError, OSError, TrainingDiverged)):
        return text
    return f"{type(exc).__name__}: {text} (unexpected: rerun with --debug for the traceback)"


def report(command: str, exc: BaseException) -> int:
    """Print the command's one line for `exc` (once across torchrun's ranks) and return the exit code."""
    name = f"minimax-gpt {command}" if command else "minimax-gpt"
    if isinstance(exc, KeyboardInterrupt):
        line, code = f"{name}: interrupted", 130
    elif isinstance(exc, Terminated):
        line, code = f"{name}: stopped by SIGTERM", 128 + signal.SIGTERM
    else:
        line, code = f"{name}: error: {message(exc)}", 2
    world, rank = int(os.environ.get("WORLD_SIZE") or 1), int(os.environ.get("RANK") or 0)
    if world > 1:
        if code == 2 and rank > 0:
            line = line.replace(": error: ", f": error: rank {rank}: ", 1)
        first = _publish_and_read_first(line if code == 2 else None, wait=rank == 0)
        if first is not None:
            if rank > 0:
                return code  # rank 0 prints
            if first and first != line:  # a peer's error stopped this rank
                line, code = first, 2
    print(line, file=sys.stderr, flush=True)
    return code


def _publish_and_read_first(line: str | None, wait: bool, timeout: float = 3.0) -> str | None:
    """Publish this rank's error line (if any) in torchrun's store unless one is there already; return the first
    one published (waiting up to `timeout` seconds for it when `wait`), "" when none came, None when the store
    cannot be reached."""
    import datetime

    try:
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
    except Exception:
        return None
    if line is not None:
        store.compare_set(_STORE_KEY, "", line)
    if not wait:
        return ""
    try:
        store.wait([_STORE_KEY], datetime.timedelta(seconds=timeout))
    except Exception:  # nobody published: this rank's own line stands
        return line or ""
    return store.get(_STORE_KEY).decode()
