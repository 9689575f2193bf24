"""The OpenAPI document against the routes the extension registered, and ``gg.Client``'s face.

pytest-jupyter's in-process server with ``host_kernel = "none"``, so no kernel ever starts here.
(The REST handlers' behaviour: ``test_handlers.py``; the socket: ``test_websocket.py``.)
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gpugroups.protocol import API_PREFIX, LEGACY_PREFIX, OPS
from gpugroups.server.handlers import NotFoundHandler

from .routes import assert_documented, fetch, methods_of, our_routes

pytestmark = pytest.mark.timeout(60)


async def test_openapi_lists_every_route_and_method(jp_serverapp: Any, jp_fetch: Any) -> None:
    served = json.loads((await fetch(jp_fetch, API_PREFIX + "/openapi.json")).body)
    assert served["openapi"].startswith("3.1")
    assert served["servers"] == [{"url": jp_serverapp.base_url.rstrip("/")}]
    routes = our_routes(jp_serverapp)
    assert {p for p, h, _ in routes if h is not NotFoundHandler} >= {
        API_PREFIX + op.path for op in OPS.values()
    }
    for path, handler, kwargs in routes:
        if handler is NotFoundHandler:
            continue
        for method in methods_of(handler, kwargs):
            operation = served["paths"][path][method.lower()]
            assert operation.get("deprecated", False) == path.startswith(LEGACY_PREFIX)
            assert "403" in operation["responses"]
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(served)))
    assert refs <= set(served["components"]["schemas"])


async def test_the_served_document_states_every_limit(jp_serverapp: Any, jp_fetch: Any) -> None:
    """The server's own settings (with their configured values), each param's limits and caps, the
    work budget and the exclusive params: all in the document a client reads."""
    from gpugroups.protocol import MAX_NEW_TOKENS, MAX_NUM_PREDICTIONS, MAX_PROMPT_CHARS, MAX_REQUEST_WORK

    served = json.loads((await fetch(jp_fetch, API_PREFIX + "/openapi.json")).body)
    host = jp_serverapp.web_app.settings["gpugroups_host"]
    info = served["info"]["description"]
    for setting in ("max_body_bytes", "request_timeout", "ws_send_timeout"):
        assert f"GpuGroupsHost.{setting}" in info and f" {getattr(host, setting):.15g} " in info
    process = served["paths"][API_PREFIX + "/models/process"]["post"]
    body = process["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert body["prompt"]["maxLength"] == MAX_PROMPT_CHARS
    assert str(MAX_NUM_PREDICTIONS) in body["num_predictions"]["description"]
    assert str(MAX_NEW_TOKENS) in body["max_new_tokens"]["description"]
    assert "max_request_work" in process["description"] and str(MAX_REQUEST_WORK) in process["description"]
    load = served["paths"][API_PREFIX + "/models/load"]["post"]
    assert load["requestBody"]["content"]["application/json"]["schema"]["not"]["required"] == ["device_id", "device_ids"]


def test_openapi_lists_each_ops_errors(spec: dict[str, Any]) -> None:
    from gpugroups.errors import HTTP_STATUS

    for op in OPS.values():
        for code in [*op.errors, "host_unavailable", "timeout"]:
            assert_documented(spec, API_PREFIX + op.path, op.http_method, HTTP_STATUS[code])
        body = spec["paths"][API_PREFIX + op.path][op.http_method.lower()].get("requestBody")
        body_params = [p for p in op.params if not p.in_path]
        if body_params:
            schema = body["content"]["application/json"]["schema"]
            assert set(schema["properties"]) == {p.name for p in body_params}
            assert schema["additionalProperties"] is False
