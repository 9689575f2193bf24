"""Coalescing of manager events for consumers slower than the manager: the host endpoint (which
sends them to the server) and the panel (which puts them in a synced trait).

Every ``state_update`` carries the whole state and every ``load_progress`` the whole progress of
its operation, so in a burst only the newest of each needs to travel. A ``Coalescer`` takes events
from any thread and hands them, superseded ones dropped, to one sink on its own thread, ``delay``
seconds after the first event of a burst (or at once on ``flush``). Light: no torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

Event = Mapping[str, Any]
Sink = Callable[[list[Event]], None]

_log = logging.getLogger(__name__)


def supersede_key(event: Event) -> Hashable | None:
    """What a later event must share with ``event`` to make it redundant (None: never redundant)."""
    kind = event.get("type")
    if kind == "state_update":
        return "state_update"
    if kind == "load_progress":
        return ("load_progress", event.get("operation_id"))
    return None


def coalesce(events: list[Event]) -> list[Event]:
    """``events`` in order, less each one that a later event with the same key supersedes.

    Among ``state_update`` events the highest version wins wherever it stands, so a snapshot
    taken by a reader (newer) is never replaced by an event still on its way (older). A
    ``system_state`` (a whole state, perhaps of a new host or manager whose versions start again)
    supersedes every state before it, and versions are compared only after the last one.
    """
    whole = max((i for i, e in enumerate(events) if e.get("type") == "system_state"), default=-1)
    events = [e for i, e in enumerate(events) if i >= whole or e.get("type") not in _STATES]
    keep: dict[Hashable, int] = {}
    for i, event in enumerate(events):
        key = supersede_key(event)
        if key is None:
            continue
        j = keep.get(key)
        if j is None or key != "state_update" or event.get("version", 0) >= events[j].get("version", 0):
            keep[key] = i
    return [e for i, e in enumerate(events) if keep.get(supersede_key(e), i) == i]


_STATES = ("state_update", "system_state")


class Coalescer:
    """Collect events from any thread; deliver them coalesced to ``sink``, in order, one batch at a
    time, from a daemon thread ``delay`` seconds after the first event of a burst, and at least
    ``interval`` seconds after the batch before (a lone event goes at once; a long burst goes as a
    bounded rate of batches, each with the newest state, so a slow reader is never flooded)."""

    def __init__(self, sink: Sink, delay: float = 0.0, name: str = "gpugroups-coalesce", interval: float = 0.0) -> None:
        self._sink = sink
        self._delay = delay
        self._interval = interval
        self._last = 0.0  # monotonic time of the last delivery from the thread
        self._cond = threading.Condition()
        self._delivering = threading.Lock()  # keeps flushes from two threads in order
        self._pending: list[Event] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def offer(self, event: Event) -> None:
        """Queue one event (safe from any thread; never blocks on the sink)."""
        with self._cond:
            if self._stopped:
                return
            self._pending.append(event)
            self._cond.notify()

    def flush(self) -> None:
        """Deliver whatever is pending now, on the calling thread."""
        with self._delivering:
            with self._cond:
                events, self._pending = self._pending, []
            items = coalesce(events)
            if not items:
                return
            try:
                self._sink(items)
            except Exception:  # a failing sink must not end the delivery of later events
                _log.exception("gpugroups: delivering %d event(s) failed", len(items))

    def stop(self, flush: bool = False) -> None:
        """End the delivery thread; pending events are delivered first with ``flush``, else dropped."""
        with self._cond:
            self._stopped = True
            if not flush:
                self._pending.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                stopped = self._stopped
            if not stopped:
                wait = max(self._delay, self._last + self._interval - time.monotonic())
                if wait > 0:
                    time.sleep(wait)  # let the rest of the burst arrive
            self.flush()
            self._last = time.monotonic()
            if stopped:
                return
