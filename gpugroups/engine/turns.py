"""A device's queue: which of its waiting tasks runs next, and which requests share its forward pass.

Calls (loads, unloads, pauses, research calls) run in the order made. Among the ``process``
requests queued before the next call, the group served longest ago goes first (round robin), and
its request takes along every queued request that may share the pass. The worker's thread runs
what ``Turns.take`` hands it; light (no torch), like the worker.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .calls import Request

#: Most requests one forward pass serves.
MAX_BATCH = 32
#: ``shares(group_id, member_a, member_b)``: whether rows of the two members of a loaded group may
#: share a pass (False when the group is not loaded).
Shares = Callable[[str, str, str], bool]


@dataclass
class Task:
    """One queued call (``fn``) or ``process`` request (``request``), answered through ``future``."""

    future: Future[Any]
    fn: Callable[[], Any] | None = None  # a call; None for a process request
    status: str = "busy"
    group_id: str = ""
    request: Request | None = None


def _alone(request: Request) -> bool:
    """A request that runs in a pass of its own. A sharded group's pass holds its other devices
    until it ends, and a later request's hold waits behind this one's there. A request that
    generates: continuations run one after another, and a batch of them would hold the device
    (and other groups' requests) for their sum."""
    return bool(request.after or request.max_new_tokens)


def let_others_run() -> None:
    """Hand the interpreter lock to any thread of this process that waits for it, and take it
    back: ``time.sleep(0)`` (about 0.07 ms on Linux, its timer slack)."""
    time.sleep(0)


class Turns:
    """The waiting and running tasks of one device's worker, under one condition. ``yield_`` is
    how ``take`` lets callers on their way reach the queue (``let_others_run``)."""

    def __init__(self, yield_: Callable[[], None] = let_others_run) -> None:
        self._yield = yield_
        self._tasks: deque[Task] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._running = 0
        self._running_ids: set[str] = set()
        self._stopping: set[str] = set()  # running requests asked to stop
        self._served: dict[str, int] = {}  # group -> the turn it was last served
        self._turn = 0

    @property
    def depth(self) -> int:
        """Tasks waiting or running."""
        return len(self._tasks) + self._running

    def put(self, task: Task) -> bool:
        """Queue ``task``; False once stopped (the task is not queued)."""
        with self._cv:
            if self._stop:
                return False
            self._tasks.append(task)
            self._cv.notify()
            return True

    def stop(self) -> None:
        """Take no more tasks; ``take`` answers None once the queue is empty."""
        with self._cv:
            self._stop = True
            self._cv.notify()

    def cancel(self, request_id: str) -> Task | None:
        """The queued request with this id, taken out of the queue; or None, having marked it to
        stop if it runs (``stopped``)."""
        with self._cv:
            queued = next((t for t in self._tasks if t.request is not None and t.request.request_id == request_id), None)
            if queued is not None:
                self._tasks.remove(queued)
            elif request_id in self._running_ids:
                self._stopping.add(request_id)
            return queued

    def stopped(self, request_id: str) -> bool:
        """Whether the running request with this id was asked to stop."""
        return request_id in self._stopping

    def forget(self, group_id: str) -> None:
        """A group left the device: its turn is history."""
        self._served.pop(group_id, None)

    def claim_idle(self, task: Task) -> bool:
        """Give ``task`` (a request, or a hold: no request, no call) the device at once if nothing
        waits or runs: the caller runs it in its own thread, or holds the device, and calls
        ``done``. False (nothing changed) otherwise."""
        with self._cv:
            if self._tasks or self._running or self._stop:
                return False
            self._claim([task])
            return True

    def take(self, shares: Shares) -> list[Task] | None:
        """Wait for work and answer what runs next: a call alone, or a request with every queued
        request that may share its pass (up to ``MAX_BATCH``); None once stopped and empty. Waits
        while a caller's thread has the device (``claim_idle``)."""
        with self._cv:
            while (not self._tasks and not self._stop) or self._running:
                self._cv.wait()
            if self._stop and not self._tasks:
                return None
            self._gather()
            first = self._next()
            batch = [first]
            lead = first.request
            if lead is not None and not _alone(lead) and shares(first.group_id, lead.member, lead.member):
                keep: deque[Task] = deque()
                while self._tasks and len(batch) < MAX_BATCH:
                    t = self._tasks.popleft()
                    if t.request is None:  # never reorder past a call
                        keep.append(t)
                        break
                    if (
                        t.group_id == first.group_id and not _alone(t.request)
                        and shares(first.group_id, lead.member, t.request.member)
                    ):
                        batch.append(t)
                    else:
                        keep.append(t)
                keep.extend(self._tasks)
                self._tasks = keep
            self._claim(batch)
            return batch

    def _claim(self, batch: list[Task]) -> None:
        """Under the lock: ``batch`` has the device (its group's turn is counted) until ``done``."""
        if batch[0].request is not None:
            self._turn += 1
            self._served[batch[0].group_id] = self._turn
        self._running = len(batch)
        self._running_ids = {t.request.request_id for t in batch if t.request is not None}

    def done(self) -> None:
        """What has the device (``take``'s or ``claim_idle``'s) has run."""
        with self._cv:
            self._running = 0
            self._running_ids = set()
            self._stopping.clear()
            if self._tasks or self._stop:  # the device's thread waited for a caller's thread
                self._cv.notify()

    def _gather(self) -> None:
        """Under the lock, before a batch is made. Two or more requests waiting means callers
        arrive together, and more of them may be threads of this process on their way to the
        queue, each needing the interpreter lock for its part of the path (about 0.25 ms of
        Python) while this thread holds it. Let them run for as long as each turn brings another
        request, so that a burst shares one pass instead of splitting into several. A lone request
        never waits: with one request queued there is no yield at all."""
        while 2 <= len(self._tasks) < MAX_BATCH:
            head = self._tasks[0].request
            if head is None or _alone(head):
                return
            waiting = len(self._tasks)
            self._cv.release()
            try:
                self._yield()
            finally:
                self._cv.acquire()
            if len(self._tasks) == waiting:
                return

    def _next(self) -> Task:
        """Under the lock: the task to run next. A call (load, unload, pause, research) runs in its
        turn; of the requests queued before the first call, the group served longest ago goes first
        (round robin between groups), its oldest request first."""
        best = 0
        for i, t in enumerate(self._tasks):
            if t.request is None:
                break
            if self._served.get(t.group_id, 0) < self._served.get(self._tasks[best].group_id, 0):
                best = i
        task = self._tasks[best]
        del self._tasks[best]
        return task
