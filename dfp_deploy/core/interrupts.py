"""Turn SIGINT, SIGTERM and SIGHUP into one exception that no library can swallow unnoticed.

The handler raises `Interrupted` (a KeyboardInterrupt, so every existing `except KeyboardInterrupt` cleanup runs)
and also records the signal. Libraries can lose the exception: torch's exporters catch broad errors around
tracing and the interpreter drops an exception raised inside a destructor ("Exception ignored in ..."). So code
that catches `Exception` around library calls, and the commit point of a build, ask `raise_if_received()`: a
recorded signal stops the build even when its exception was lost.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_received: int | None = None


class Interrupted(KeyboardInterrupt):
    """A build stopped by a signal. `output` is set when the new output was already in place when it came."""

    def __init__(self, signum: int, output: str | None = None):
        super().__init__(signum)
        self.signum = signum
        self.output = output

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        # the shell's convention for "killed by signal N", which CI systems and `timeout` understand
        return 128 + self.signum


def exit_code(exc: BaseException) -> int:
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def describe(exc: BaseException) -> str:
    """The CLI's one line for an interrupt."""
    name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
    if isinstance(exc, Interrupted) and exc.output:
        return f"interrupted ({name}) after the new output was in place in {exc.output}"
    return f"interrupted ({name}): the output folder was left as it was, no staging folder left"


def received() -> int | None:
    """The first signal recorded since the handlers were installed (None: none)."""
    return _received


def record(signum: int) -> None:
    global _received
    if _received is None:
        _received = signum


def raise_if_received(exc: BaseException | None = None) -> None:
    """Raise `Interrupted` if a signal was recorded, or if `exc` was caused by an interrupt (a library wrapped it)."""
    if _received is not None:
        raise Interrupted(_received) from exc
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def _raise(signum, frame) -> None:
    record(signum)
    raise Interrupted(signum)


def _unraisable_hook(previous):
    def hook(unraisable):
        # an interrupt raised inside a destructor is recorded already; a traceback for it would break the one-line
        # promise, and raise_if_received() raises it again where it can stop the build
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _received is not None:
            return
        previous(unraisable)
    return hook


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def handled() -> Iterator[None]:
    """Install the raising handlers for the duration (main thread only; elsewhere signals cannot be handled)."""
    global _received
    if not _main_thread():
        yield
        return
    _received = None
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    hook = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook(hook)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def deferred() -> Iterator[list[int]]:
    """A critical section (the swap into place): signals are collected in the yielded list, not raised, until it
    ends; the caller then decides what an interrupt that came meanwhile means."""
    got: list[int] = []
    if not _main_thread():
        yield got
        return

    def collect(signum, frame):
        got.append(signum)
        if ours:
            record(signum)

    ours = signal.getsignal(signal.SIGINT) is _raise
    previous = {s: signal.signal(s, collect) for s in SIGNALS}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
