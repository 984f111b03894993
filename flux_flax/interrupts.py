"""Ctrl-C and SIGTERM for the command-line tools, so that an interrupted command leaves nothing
half-written and never loses an output it replaces.

Within `raising()` both signals raise in the main thread (KeyboardInterrupt, `Terminated`) and are
remembered: a library that catches the exception on its way (an event loop, a worker pool) cannot
make the command forget it, since `check()` raises it again before a commit's point of no return.
`held()` marks that point: the renames that put an output in place run to their end, and a signal
arriving inside arrives too late to stop them (the command finishes as if it had come after).
`deferred()` guards a step that must not stop halfway but may stop right after (creating a
temporary directory and recording it for removal, starting a background write and keeping its
handle): a signal arriving inside is raised at the block's end. Where Python cannot raise a
signal's exception at all (it landed in a weakref callback or a `__del__`), Python would report it
("Exception ignored in" and a traceback); inside `raising()` it is remembered instead, not reported.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None  # the signal that arrived inside `raising()` and was not yet dropped
_holding = False


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so that partial outputs are removed."""


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _remember(signum, frame) -> None:
    global _received
    _received = signum
    if not _holding:
        raise _exception(signum)


def _unraisable(previous_hook):
    """sys.unraisablehook that drops the exception of a signal `_remember` has remembered (raised
    where Python can only report it: `check` raises it again) and passes anything else on."""
    def hook(unraisable) -> None:
        if _received is not None and isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
            return
        previous_hook(unraisable)
    return hook


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise KeyboardInterrupt / `Terminated` in the main thread
    and are remembered for `check`; the previous handlers come back after it."""
    global _received
    _received = None
    previous = {s: signal.signal(s, _remember) for s in _SIGNALS}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = previous_hook
        _received = None


def check() -> None:
    """Raises the signal that arrived inside `raising()` if some code caught its exception."""
    if _received is not None:
        raise _exception(_received)


def _inside_raising() -> bool:
    """Whether `raising()`'s handlers serve SIGINT now."""
    return signal.getsignal(signal.SIGINT) is _remember


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM do not interrupt the block; yields a list that holds, after the block,
    the signal that arrived inside (if one did). Signals reach the main thread only: elsewhere the
    block runs as it is. Inside another such block the outer one holds the signals (and gets them)."""
    global _holding, _received
    if threading.current_thread() is not threading.main_thread() or _holding:
        yield []
        return
    previous = {} if _inside_raising() else {s: signal.signal(s, _remember) for s in _SIGNALS}
    before, _received, _holding = _received, None, True
    arrived: list[int] = []
    try:
        yield arrived
    finally:
        _holding = False
        if _received is not None:
            arrived.append(_received)
        _received = before
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM do not interrupt it: one arriving there is dropped once
    the block has run to its end (outside `raising()` as well: the default handlers wait too)."""
    with _signals_held():
        yield


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM do not interrupt it: one arriving there is raised once
    the block has run to its end, as it would have been had it arrived just after (inside
    `raising()`: KeyboardInterrupt / `Terminated`, remembered for `check`; outside: the signal's
    own handler)."""
    global _received
    inside_raising = _inside_raising()
    arrived: list[int] = []
    try:
        with _signals_held() as arrived:
            yield
    finally:  # also when the block raised: the signal is not lost behind its exception
        if arrived:
            if inside_raising:
                _received = arrived[0]
                raise _exception(arrived[0])
            signal.raise_signal(arrived[0])
