"""What training does when something goes wrong: non-finite steps and stop signals.

    bad = BadStepTracker(max_bad_steps=10)      # train.max_bad_steps
    bad.record(finite)                           # counts skipped steps, in total and in a row
    bad.check(step, last_checkpoint)             # raises TrainingDiverged once 10 in a row were non-finite

    with GracefulStop() as stop:                 # SIGINT / SIGTERM set stop.requested instead of killing
        for step in ...:
            ...
            if stop.requested:                   # "SIGTERM": save a checkpoint and leave the loop
                break

A second signal while the first is being handled raises KeyboardInterrupt at once (an impatient Ctrl-C still works;
a checkpoint being written is then discarded whole, see `atomic.atomic_directory`).
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


class BadStepTracker:
    """Counts steps whose loss or gradient norm was not finite: in total, and in the current streak.

    max_bad_steps: the streak length at which `record` raises TrainingDiverged; 0 = never."""

    def __init__(self, max_bad_steps: int, skipped: int = 0):
        if isinstance(max_bad_steps, bool) or not isinstance(max_bad_steps, int) or max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be an int >= 0 (0 = no limit), got {max_bad_steps!r}")
        self.max_bad_steps = max_bad_steps
        self.skipped = skipped  # total, across resumes
        self.streak = 0

    def record(self, finite: bool) -> None:
        if finite:
            self.streak = 0
        else:
            self.skipped += 1
            self.streak += 1

    def check(self, step: int, last_checkpoint: object = None) -> None:
        """Raise TrainingDiverged when the streak has reached max_bad_steps."""
        if self.max_bad_steps and self.streak >= self.max_bad_steps:
            where = f"the last checkpoint, {last_checkpoint}, is intact" if last_checkpoint else "no checkpoint yet"
            raise TrainingDiverged(
                f"step {step}: {self.streak} consecutive steps with a non-finite loss or gradient "
                f"(train.max_bad_steps = {self.max_bad_steps}); stopping. No update was applied in those steps and "
                f"{where}. Lower the learning rate, raise warm-up or check the data, then continue with --resume "
                f"(or set train.max_bad_steps = 0 to never stop)")


class GracefulStop:
    """Context manager: while active, SIGINT and SIGTERM set `requested` to the signal's name (e.g. "SIGTERM")
    instead of ending the process; the previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) it does nothing and says so once."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.requested: str | None = None
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name}); stopping at once")
        self.requested, self.signum = signal.Signals(signum).name, signum
        logger.warning("%s received: finishing the current step, then saving a checkpoint and stopping "
                       "(send it again to stop at once)", self.requested)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            logger.info("not in the main thread: SIGINT / SIGTERM are not turned into a clean stop")
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
