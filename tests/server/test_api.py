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


def test_client_methods_mirror_the_manager() -> None:
    import inspect

    from gpugroups import Client
    from gpugroups.engine.manager import Manager

    for op in OPS.values():
        client_params = list(inspect.signature(getattr(Client, op.manager_method)).parameters)
        manager_params = list(inspect.signature(getattr(Manager, op.manager_method)).parameters)
        assert client_params == manager_params, op.name


def test_client_error_from_a_non_json_answer() -> None:
    """A proxy's HTML error page still becomes a GpuGroupsError, not a JSON decode error."""
    import http.server
    import threading

    from gpugroups import Client, GpuGroupsError

    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>bad gateway</html>")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.handle_request, daemon=True).start()
    with pytest.raises(GpuGroupsError) as exc:
        Client(f"http://127.0.0.1:{server.server_address[1]}").state()
    server.server_close()
    assert exc.value.code == "internal_error" and "502" in exc.value.message
