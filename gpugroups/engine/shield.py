"""Ctrl-C held off while the manager's books change.

In a kernel, Interrupt is a SIGINT, and Python raises ``KeyboardInterrupt`` in the main thread at
whatever line it is on. Between two lines of the manager's bookkeeping (a slot made but its load
thread not started, a group marked unloading but its unload not queued, a request counted in
flight but not yet waited for) that left a group loading, unloading or busy for good. So while the
manager's lock is held in the main thread, an interrupt is only noted, and raised as the lock is
let go; the bookkeeping under the lock is short, and waits happen outside it (a wait on one of
its conditions lifts the shield, so it stays interruptible). Other threads get no signals.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_MAIN = threading.main_thread().ident


class ShieldedLock:
    """A re-entrant lock that, held in the main thread, holds back SIGINT until it is let go
    (``threading.Condition`` may wait on it: a wait lifts the shield)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # the main thread's nesting
        self._previous: Any = None  # the SIGINT handler the shield replaced
        self._caught = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        main = threading.get_ident() == _MAIN
        if main:
            if self._depth == 0:  # before the lock: an interrupt from here on is only noted
                self._raise_up()
            self._depth += 1
        got = self._lock.acquire(blocking, timeout)
        if main and not got:
            self._let_go()
        return got

    def release(self) -> None:
        self._lock.release()
        if threading.get_ident() == _MAIN:
            self._let_go()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _let_go(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._lower()

    # ``threading.Condition`` waits through these: the wait is interruptible, the shield comes back after.
    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined, no-any-return]

    def _release_save(self) -> Any:
        depth = self._depth if threading.get_ident() == _MAIN else 0
        if depth:
            self._depth = 0
            self._restore()
        return depth, self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, saved: Any) -> None:
        depth, state = saved
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]
        if depth:
            self._raise_up()
            self._depth = depth

    def _raise_up(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGINT, self._note)
        except ValueError:  # not the main interpreter: no shield, as before
            self._previous = None

    def _note(self, signum: int, frame: Any) -> None:
        self._caught = True

    def _restore(self) -> bool:
        """Put the replaced handler back; whether an interrupt was noted meanwhile."""
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        return self._caught

    def _lower(self) -> None:
        """Put the replaced handler back and deliver an interrupt that came meanwhile."""
        previous = self._previous
        if self._restore():
            self._caught = False
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt
