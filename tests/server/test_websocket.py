"""``WS /api/v2/ws`` without a host kernel: who may connect, and what a socket hears when there
is no host. (With a host: ``test_host.py`` and ``test_end_to_end.py``.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from gpugroups.protocol import API_PREFIX, LEGACY_PREFIX

from .routes import browser_login, fetch

pytestmark = pytest.mark.timeout(60)


async def test_websocket_refuses_missing_token_and_foreign_origin(
    jp_serverapp: Any, jp_fetch: Any, jp_ws_fetch: Any, jp_http_port: int
) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "token wrong-token"}):
        with pytest.raises(HTTPClientError) as exc:
            await jp_ws_fetch(API_PREFIX, "ws", headers=headers)
        assert exc.value.code == 403
        assert exc.value.response is not None
        assert exc.value.response.headers["Content-Type"].startswith("application/json")
        assert json.loads(exc.value.response.body)["error"]["code"] == "forbidden"
    # a browser session (cookie) from a foreign page is refused; from the server's own origin it is not
    cookie_only, _ = await browser_login(jp_serverapp, jp_fetch)
    # the login cookie is named after the host the login went to: jp_fetch's 127.0.0.1
    own = f"http://127.0.0.1:{jp_http_port}"
    url = "ws" + own[4:] + jp_serverapp.base_url + API_PREFIX.lstrip("/") + "/ws"
    with pytest.raises(HTTPClientError) as exc:
        await websocket_connect(HTTPRequest(url, headers={**cookie_only, "Origin": "http://evil.example"}))
    assert exc.value.code == 403
    assert exc.value.response is not None
    error = json.loads(exc.value.response.body)["error"]
    assert error["code"] == "forbidden" and "evil.example" in error["message"]
    ws = await websocket_connect(HTTPRequest(url, headers={**cookie_only, "Origin": own}))
    ws.close()
    served = json.loads((await fetch(jp_fetch, API_PREFIX + "/openapi.json")).body)
    assert {"403", "400"} <= set(served["paths"][API_PREFIX + "/ws"]["get"]["responses"])
    assert "404" not in served["paths"][API_PREFIX + "/ws"]["get"]["responses"]  # documents what it answers


async def test_the_v1_socket_says_it_is_deprecated(jp_fetch: Any, jp_ws_fetch: Any) -> None:
    ws = await jp_ws_fetch(LEGACY_PREFIX, "ws")
    try:
        assert ws.headers["Deprecation"].startswith("@") and 'rel="successor-version"' in ws.headers["Link"]
    finally:
        ws.close()
    v2 = await jp_ws_fetch(API_PREFIX, "ws")
    assert "Deprecation" not in v2.headers
    v2.close()
    with pytest.raises(HTTPClientError) as exc:  # its refusals too
        await jp_fetch(LEGACY_PREFIX.lstrip("/"), "ws")
    assert exc.value.code == 400 and exc.value.response is not None
    assert exc.value.response.headers["Deprecation"].startswith("@")


async def test_a_plain_get_of_the_websocket_route_is_a_json_400(jp_fetch: Any) -> None:
    with pytest.raises(HTTPClientError) as exc:
        await jp_fetch(API_PREFIX.lstrip("/"), "ws")
    assert exc.value.code == 400 and exc.value.response is not None
    assert json.loads(exc.value.response.body)["error"]["code"] == "invalid_request"


async def test_websocket_reports_no_host_then_answers_get_state(jp_ws_fetch: Any) -> None:
    ws = await jp_ws_fetch(API_PREFIX, "ws")
    try:
        first = json.loads(await ws.read_message())
        assert first["type"] == "error" and first["error"]["code"] == "host_unavailable"
        ws.write_message("nonsense")
        assert json.loads(await ws.read_message())["error"]["code"] == "invalid_request"
        ws.write_message(json.dumps({"type": "get_state"}))
        assert json.loads(await ws.read_message())["error"]["code"] == "host_unavailable"
    finally:
        ws.close()


async def test_closed_sockets_are_released_without_waiting_for_their_ping(jp_ws_fetch: Any) -> None:
    """A burst of connections costs memory only while they are open: a closed socket's ping timer
    is stopped (jupyter_server's kept the handler alive until its next tick, 30 s later, so 800
    connections in a row held 50,000 objects). A stopped timer is dropped by the event loop once
    such timers are the most of its timers, so a burst leaves at most a few behind."""
    import asyncio
    import gc

    from gpugroups.server.websocket import EventsSocket

    def held() -> int:
        gc.collect()
        return sum(isinstance(o, EventsSocket) for o in gc.get_objects())

    before = held()
    for _ in range(150):
        ws = await jp_ws_fetch(API_PREFIX, "ws")
        await ws.read_message()
        ws.close()
    await asyncio.sleep(0.5)  # the server sees the last closes, its loop turns over its timers
    assert held() - before < 50
