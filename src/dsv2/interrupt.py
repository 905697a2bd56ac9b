"""Ctrl-C that stops a loop between two of its steps, for the commands that can stop cleanly (train, chat).

A KeyboardInterrupt raised in the middle of a step could leave state half-updated (an optimizer step without
the step counter's, a scheduler between schedule() and update()), so the first SIGINT only asks the loop to stop
at its next check; a second one raises KeyboardInterrupt at once, for a user who will not wait.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType


class StopRequest:
    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.requested = False
        self._on_first = on_first

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._on_first is not None:
            self._on_first()


@contextlib.contextmanager
def stop_on_sigint(enabled: bool = True, on_first: Callable[[], None] | None = None) -> Iterator[StopRequest]:
    """A StopRequest installed as the SIGINT handler for the block; `requested` stays False when not enabled or
    off the main thread (only the main thread may set signal handlers)."""
    stop = StopRequest(on_first)
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
