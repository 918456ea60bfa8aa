"""Per-thread console output: jobs run side by side in one process (jobs.pipeline with parallel > 1)
each print to their own log file, while the main thread keeps the console.

`route(stream)` sends this thread's prints (and those of threads it starts through `inherit`) to
`stream`; everything else goes to the real stdout, as before.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import TextIO


class ThreadRoutedStdout:
    """A sys.stdout that writes each thread's output to the stream routed for it (else the original)."""

    def __init__(self, original: TextIO):
        self.original = original
        self.routes: dict[int, TextIO] = {}

    def target(self) -> TextIO:
        return self.routes.get(threading.get_ident(), self.original)

    def write(self, text: str) -> int:
        return self.target().write(text)

    def flush(self) -> None:
        self.target().flush()

    def __getattr__(self, name):  # isatty, encoding, fileno ...: the original's
        return getattr(self.original, name)


_lock = threading.Lock()


def current_stream() -> TextIO | None:
    """The stream this thread's prints are routed to, or None when they go to the console."""
    out = sys.stdout
    return out.routes.get(threading.get_ident()) if isinstance(out, ThreadRoutedStdout) else None


@contextmanager
def route(stream: TextIO | None):
    """Within the block, this thread's prints go to `stream` (None: no change)."""
    if stream is None:
        yield
        return
    with _lock:
        if not isinstance(sys.stdout, ThreadRoutedStdout):
            sys.stdout = ThreadRoutedStdout(sys.stdout)
        router: ThreadRoutedStdout = sys.stdout
    ident = threading.get_ident()
    router.routes[ident] = stream
    try:
        yield
    finally:
        router.routes.pop(ident, None)


def inherit(target):
    """`target` wrapped so that, run in a new thread, it prints where the creating thread prints."""
    stream = current_stream()

    def run(*args, **kwargs):
        with route(stream):
            return target(*args, **kwargs)

    return run
