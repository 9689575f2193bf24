"""The event bus: version order, unsubscribe, built fields only for whom reads them, and a failing
subscriber logged once, never fatal."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from gpugroups.engine.bus import EventBus
from tests.waiting import wait_for


class CountedBuild:
    """An event's costly fields (a state), counting how often they were built."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return {"state": "big"}


def test_events_arrive_in_version_order_until_unsubscribed():
    bus = EventBus()
    got: list[dict] = []
    unsubscribe = bus.subscribe(got.append)
    for _ in range(5):
        bus.emit("tick", n=1)
    assert wait_for(lambda: len(got) == 5)
    unsubscribe()
    bus.emit("tick", n=2)
    bus.close()
    assert [e["version"] for e in got] == [1, 2, 3, 4, 5]
    assert got[0] == {"type": "tick", "version": 1, "n": 1}


@pytest.mark.parametrize("error", [RuntimeError, SystemExit])  # SystemExit too: it once ended delivery
def test_a_failing_subscriber_is_logged_once_with_its_traceback_and_the_others_still_receive(caplog, error):
    bus = EventBus()
    got: list[dict] = []

    def broken(event: dict) -> None:
        raise error("subscriber broke")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    with caplog.at_level(logging.ERROR, logger="gpugroups"):
        for _ in range(3):
            bus.emit("tick")
        bus.close()
    assert [e["version"] for e in got] == [1, 2, 3]
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], error)]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert "subscriber broke" in caplog.text and "Traceback" in caplog.text


def test_a_subscriber_may_close_the_bus_it_listens_to():
    bus = EventBus()
    closed = threading.Event()
    bus.subscribe(lambda event: (bus.close(), closed.set()))
    bus.emit("tick")
    assert wait_for(closed.is_set)  # no "cannot join current thread"
    bus.close()


def test_built_fields_are_built_only_while_a_subscriber_reads_them():
    bus = EventBus()
    build = CountedBuild()
    versions: list[dict] = []
    bus.subscribe(versions.append, built=False)  # follows versions only (a load's progress bar)
    bus.emit("state_update", build=build)
    assert wait_for(lambda: len(versions) == 1)
    assert build.calls == 0 and versions[0] == {"type": "state_update", "version": 1}

    states: list[dict] = []
    unsubscribe = bus.subscribe(states.append)
    bus.emit("state_update", build=build)
    assert wait_for(lambda: len(states) == 1 and len(versions) == 2)
    assert build.calls == 1 and states[0]["state"] == "big" and versions[1]["state"] == "big"  # one build, shared

    unsubscribe()
    bus.emit("state_update", build=build)
    bus.close()
    assert [e["version"] for e in versions] == [1, 2, 3] and build.calls == 1


def test_events_without_subscribers_are_numbered_and_a_later_subscriber_gets_only_later_ones():
    bus = EventBus()
    for _ in range(3):
        bus.emit("tick", build=lambda: {"state": "never built"})
    assert bus.version == 3 and bus.settle(timeout=0)  # numbered, and nothing queued for the bus thread
    got: list[dict] = []
    bus.subscribe(got.append)
    bus.emit("tick")
    bus.close()
    assert [e["version"] for e in got] == [4]


def test_a_subscriber_from_a_later_instant_takes_only_what_follows_and_costs_nothing_before():
    bus = EventBus()
    build = CountedBuild()
    got: list[dict] = []
    bus.subscribe(got.append, after=time.monotonic() + 0.3)
    bus.emit("state_update", build=build)  # before its instant: not built, not delivered
    assert bus.settle(timeout=5)  # nothing was queued: settled at once
    time.sleep(0.3)
    bus.emit("state_update", build=build)
    assert bus.settle(timeout=5)  # delivered by the time it returns
    assert [e["version"] for e in got] == [2] and got[0]["state"] == "big" and build.calls == 1
    bus.close()
