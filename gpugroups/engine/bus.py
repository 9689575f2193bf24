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
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]
Subscriber = Callable[[Event], None]

log = logging.getLogger("gpugroups")


class EventBus:
    """Numbers events and hands them to the subscribers, in order, from one background thread."""

    def __init__(self) -> None:
        self.version = 0
        self._subscribers: list[Subscriber] = []
        self._failed: set[int] = set()  # ids of subscribers already logged as failing
        self._lock = threading.Lock()
        self._events: queue.SimpleQueue[tuple[Event, Callable[[], Event] | None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._dispatch, name="gpugroups-events", daemon=True)
        self._thread.start()

    def emit(self, type_: str, build: Callable[[], dict[str, Any]] | None = None, **fields: Any) -> None:
        """Number and queue an event. The caller holds the lock that orders the changes.

        ``build()``, if given, returns more fields; it runs on the bus thread, outside that lock.
        """
        self.version += 1
        self._events.put(({"type": type_, "version": self.version, **fields}, build))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Deliver every later event to ``callback``; returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
                self._failed.discard(id(callback))

        return unsubscribe

    def close(self) -> None:
        """Deliver what is queued, then stop the thread."""
        self._events.put(None)
        self._thread.join(timeout=10)

    def _dispatch(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            event, build = item
            with self._lock:
                subscribers = list(self._subscribers)
            if not subscribers:
                continue
            if build is not None:
                try:
                    event.update(build())
                except Exception:  # never stop delivery; the next event carries the state again
                    log.exception("gpugroups: building event %s failed", event.get("version"))
                    continue
            for cb in subscribers:
                try:
                    cb(event)
                except Exception:  # a broken subscriber must not stop the others
                    if id(cb) not in self._failed:
                        self._failed.add(id(cb))
                        log.exception("gpugroups: event subscriber %r failed (logged once; it keeps receiving)", cb)
            # free a delivered event now, not when the next one arrives: a state of a large
            # catalog is thousands of objects, and freeing them would hold up the next change
            del item, event, build
