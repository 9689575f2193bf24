"""The event bus: numbered events delivered to subscribers in version order from one thread.

Events are numbered by ``emit`` under the manager's lock, so their order is the order of the
changes; delivery happens later on the bus's own thread, so a slow subscriber never holds the
lock. Fields that are costly to build (the state JSON) are built there too, from a snapshot
taken under the lock, and only when someone listens. A subscriber that raises is logged (once, with its traceback) and keeps receiving.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import GpuGroupsError

Event = dict[str, Any]
Subscriber = Callable[[Event], None]

log = logging.getLogger("gpugroups")


@dataclass(frozen=True, eq=False)
class _Subscription:
    callback: Subscriber
    built: bool  # it reads the fields ``build`` adds
    after: float  # it takes the events emitted from this ``time.monotonic()`` on


#: Seconds ``close`` waits for the events queued before it to be delivered.
CLOSE_WAIT_S = 10.0


class EventBus:
    """Numbers events and hands them to the subscribers, in order, from one background thread."""

    def __init__(self) -> None:
        self.version = 0
        self._queued = 0  # the version of the last event queued for delivery
        self._delivered = 0  # and of the last one delivered
        self._subscribers: list[_Subscription] = []
        self._failed: set[int] = set()  # ids of subscribers already logged as failing
        self._lock = threading.Lock()
        self._delivery = threading.Condition(self._lock)  # notified as events are delivered
        self._events: queue.SimpleQueue[tuple[Event, Callable[[], Event] | None, float] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._dispatch, name="gpugroups-events", daemon=True)
        self._thread.start()

    def emit(self, type_: str, build: Callable[[], dict[str, Any]] | None = None, **fields: Any) -> None:
        """Number and queue an event. The caller holds the lock that orders the changes.

        ``build()``, if given, returns more fields; it runs on the bus thread, outside that lock.
        """
        self.version += 1
        subscribers = self._subscribers  # read without the bus lock: a subscriber takes what follows it
        if not subscribers:
            return
        now = time.monotonic()
        if all(s.after > now for s in subscribers):
            return
        self._queued = self.version
        self._events.put(({"type": type_, "version": self.version, **fields}, build, now))

    def subscribe(self, callback: Subscriber, built: bool = True, after: float = 0.0) -> Callable[[], None]:
        """Deliver every later event to ``callback``; returns the function that unsubscribes.

        ``built=False``: the callback never reads the fields that ``emit``'s ``build`` adds (it
        follows versions and progress), so they are not built for it. ``after``: it takes only
        the events emitted from that ``time.monotonic()`` instant on; until then it costs nothing.
        """
        if not callable(callback):
            raise GpuGroupsError("invalid_request", f"subscribe takes a callable, got {type(callback).__name__}")
        entry = _Subscription(callback, built, after)
        with self._lock:
            self._subscribers = [*self._subscribers, entry]

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [s for s in self._subscribers if s is not entry]
                self._failed.discard(id(callback))

        return unsubscribe

    def settle(self, timeout: float) -> bool:
        """Wait until every event queued so far has been delivered; False if ``timeout`` passed first."""
        with self._delivery:
            target = self._queued
            return self._delivery.wait_for(lambda: self._delivered >= target, timeout)

    def close(self) -> None:
        """Deliver what is queued, then stop the thread. Waits ``CLOSE_WAIT_S`` at most: subscribers
        slower than that still get the rest from the thread, which ends once it is delivered."""
        self._events.put(None)
        if threading.current_thread() is not self._thread:  # a subscriber may close its manager
            self._thread.join(timeout=CLOSE_WAIT_S)

    def _dispatch(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            event, build, at = item
            subscribers = [s for s in self._subscribers if s.after <= at]
            if build is not None and any(s.built for s in subscribers):
                try:
                    event.update(build())
                except BaseException:  # never stop delivery; the next event carries the state again
                    log.exception("gpugroups: building event %s failed", event.get("version"))
                    subscribers = []
            for s in subscribers:
                try:
                    s.callback(event)
                except BaseException:  # a broken subscriber (SystemExit too) must not stop the others
                    if id(s.callback) not in self._failed:
                        self._failed.add(id(s.callback))
                        log.exception("gpugroups: event subscriber %r failed (logged once; it keeps receiving)", s.callback)
            with self._delivery:
                self._delivered = event["version"]
                self._delivery.notify_all()
            # free a delivered event now, not when the next one arrives: a state of a large
            # catalog is thousands of objects, and freeing them would hold up the next change
            del item, event, build, subscribers
