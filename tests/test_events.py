"""The coalescing of manager events shared by the host endpoint and the panel."""

from __future__ import annotations

import threading
import time
from typing import Any

from gpugroups.events import Coalescer, coalesce


def _state(v: int) -> dict[str, Any]:
    return {"type": "state_update", "version": v, "state": {"version": v}}


def _progress(op: str, p: float) -> dict[str, Any]:
    return {"type": "load_progress", "version": 0, "operation_id": op, "progress": p}


def test_coalesce_keeps_the_newest_of_each_kind_in_order():
    hello = {"type": "hello"}
    events = [hello, _state(1), _progress("a", 0.1), _progress("b", 0.5), _state(2), _progress("a", 0.9)]
    assert coalesce(events) == [hello, _progress("b", 0.5), _state(2), _progress("a", 0.9)]


def test_coalesce_prefers_the_highest_state_version_wherever_it_stands():
    # a reader's snapshot (v5) queued before an older event still on its way (v4)
    assert coalesce([_state(5), _state(4)]) == [_state(5)]


def test_a_whole_state_supersedes_the_states_before_it_and_versions_start_again_after_it():
    # the host serves another manager: its system_state v0, then its own updates from v1
    whole = {"type": "system_state", "version": 0, "state": {"version": 0}}
    error = {"type": "error"}
    events = [_state(7), whole, error, _state(1), _state(8) | {"type": "system_state"}, _state(2)]
    assert coalesce(events[:4]) == [whole, error, _state(1)]
    assert coalesce(events) == [error, _state(8) | {"type": "system_state"}, _state(2)]


def test_coalescer_delivers_each_burst_once_and_in_order():
    batches: list[list[dict[str, Any]]] = []
    arrived = threading.Event()

    def sink(items: list[dict[str, Any]]) -> None:
        batches.append(items)
        arrived.set()

    c = Coalescer(sink, delay=0.05)
    try:
        for v in range(1, 11):
            c.offer(_state(v))
        assert arrived.wait(5)
        c.flush()
        versions = [e["version"] for b in batches for e in b]
        assert versions[-1] == 10 and versions == sorted(versions)
        assert len(versions) < 10  # the burst was coalesced, not sent event by event
    finally:
        c.stop()


def test_a_long_burst_goes_out_at_a_bounded_rate_and_ends_with_the_newest_state():
    batches: list[list[dict[str, Any]]] = []
    c = Coalescer(batches.append, interval=0.1)
    try:
        t0 = time.monotonic()
        for v in range(1, 301):  # a burst as long as several intervals
            c.offer(_state(v))
            time.sleep(0.001)
        elapsed = time.monotonic() - t0
        c.stop(flush=True)
    finally:
        c.stop()
    assert len(batches) <= elapsed / 0.1 + 2  # one batch per interval at most
    assert batches[-1][-1] == _state(300)


def test_a_failing_sink_does_not_stop_later_deliveries():
    seen: list[int] = []

    def sink(items: list[dict[str, Any]]) -> None:
        seen.extend(e["version"] for e in items)
        if items[-1]["version"] == 1:
            raise RuntimeError("boom")

    c = Coalescer(sink)
    try:
        c.offer(_state(1))
        c.flush()
        c.offer(_state(2))
        c.flush()
        assert seen == [1, 2]
    finally:
        c.stop()


def test_stop_with_flush_delivers_what_is_pending_and_ends_the_thread():
    seen: list[int] = []
    gate = threading.Event()
    c = Coalescer(lambda items: (gate.wait(5), seen.extend(e["version"] for e in items)), name="t-coalesce")
    c.offer(_state(1))
    c.offer(_state(2))
    gate.set()
    c.stop(flush=True)
    assert seen[-1] == 2
    assert "t-coalesce" not in {t.name for t in threading.enumerate()}
