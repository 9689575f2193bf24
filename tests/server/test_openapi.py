"""The served OpenAPI document describes what a real server really answers: REST results and
WebSocket events from a live server (host kernel auto-started) validate against its schemas."""

from __future__ import annotations

import pytest

from tests.contract import check

from .conftest import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


_EVENT_SCHEMA = {
    "system_state": "SystemStateEvent",
    "state_update": "StateUpdateEvent",
    "load_progress": "LoadProgressEvent",
    "error": "ErrorEvent",
}


def test_rest_results_and_events_conform_to_the_served_schemas(live: LiveServer) -> None:
    client = live.client(timeout=120)
    spec = client.openapi()
    with client.events(timeout=10) as events:
        first = next(events)
        check(spec, "SystemStateEvent", first)
        check(spec, "State", client.state())
        check(spec, "LoadResult", client.load("tiny-a"))
        check(spec, "ProcessResult", client.process("tiny-a", "hello", num_predictions=3))
        check(spec, "ProcessResult", client.process("tiny-b", "hello", max_new_tokens=2))
        check(spec, "LoadResult", client.load_group("gpt"))
        check(spec, "PinResult", client.pin("gpt"))
        check(spec, "PinResult", client.unpin("gpt"))
        check(spec, "UnloadResult", client.unload_group("gpt"))
        check(spec, "ClearResult", client.clear_device(0))
        check(spec, "Host", client.host())
        # what the calls above caused, until the stream goes quiet
        kinds = []
        while True:
            try:
                event = next(events)
            except TimeoutError:
                break
            kinds.append(event["type"])
            check(spec, _EVENT_SCHEMA[event["type"]], event)
        assert "state_update" in kinds, kinds
        events.get_state()
        while (event := next(events))["type"] != "system_state":
            pass
        check(spec, "SystemStateEvent", event)
