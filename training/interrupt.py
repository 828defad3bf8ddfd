"""Ctrl-C during a training job: SIGINT becomes :class:`TrainingInterrupted`, which the job
catches to record where it stopped (see :func:`saereg.training.job.run_training`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from saereg.registry.errors import TrainingInterrupted


@contextlib.contextmanager
def sigint_raises() -> Iterator[None]:
    """While active, Ctrl-C (SIGINT) raises :class:`TrainingInterrupted` in the main thread,
    once: the job then records that it stopped and closes its runs, and further Ctrl-Cs do not
    cut that short. Lightning would answer a ``KeyboardInterrupt`` with ``sys.exit(1)``
    before the job could do so. Does nothing outside the main thread, or where SIGINT is not
    at Python's default (ignored, or handled by the application)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise TrainingInterrupted("interrupted (SIGINT)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
