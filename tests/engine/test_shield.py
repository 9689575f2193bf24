"""Ctrl-C held off while the manager's lock is held in the main thread, raised as it is let go;
a wait on one of its conditions stays interruptible; the handler is put back.

A kernel's Interrupt is a SIGINT: raised between two lines of the manager's bookkeeping, it left
groups loading, unloading or in use for good (the slot made but no load thread started, and so on).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from gpugroups.engine.shield import ShieldedLock


def _interrupt_in(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def test_an_interrupt_while_the_lock_is_held_comes_when_it_is_let_go():
    before = signal.getsignal(signal.SIGINT)
    lock, done = ShieldedLock(), []
    with pytest.raises(KeyboardInterrupt):
        with lock:
            with lock:  # re-entrant: the outermost release delivers it
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the interrupt arrives here, and is only noted
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is before
    with lock:  # nothing noted is left over
        time.sleep(0.01)


def test_a_wait_on_a_condition_of_the_lock_stays_interruptible():
    before = signal.getsignal(signal.SIGINT)
    lock = ShieldedLock()
    cond = threading.Condition(lock)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with lock:
            _interrupt_in(0.2)
            cond.wait(10)
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGINT) is before
    assert lock.acquire(blocking=False)  # the wait gave the lock back, and re-took it to leave
    lock.release()


def test_other_threads_take_the_lock_as_a_plain_one():
    lock, out = ShieldedLock(), []
    cond = threading.Condition(lock)  # type: ignore[arg-type]

    def waiter() -> None:
        with lock:
            out.append(cond.wait(5))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    with lock:
        cond.notify_all()
    t.join(5)
    assert out == [True]
