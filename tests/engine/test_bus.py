"""The event bus: version order, unsubscribe, and a failing subscriber logged once, never fatal."""

from __future__ import annotations

import logging

from gpugroups.engine.bus import EventBus
from tests.waiting import wait_for


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


def test_a_failing_subscriber_is_logged_once_with_its_traceback_and_the_others_still_receive(caplog):
    bus = EventBus()
    got: list[dict] = []

    def broken(event: dict) -> None:
        raise RuntimeError("subscriber broke")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    with caplog.at_level(logging.ERROR, logger="gpugroups"):
        for _ in range(3):
            bus.emit("tick")
        bus.close()
    assert [e["version"] for e in got] == [1, 2, 3]
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert "subscriber broke" in caplog.text and "Traceback" in caplog.text
