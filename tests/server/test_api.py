"""The REST surface without a host kernel: routes, OpenAPI, auth refusals, bad requests, v1 aliases.

pytest-jupyter's in-process server with ``host_kernel = "none"``, so no kernel ever starts here:
a bad request must be refused before anything would reach a kernel.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from gpugroups.protocol import API_PREFIX, LEGACY_PREFIX, OPS
from gpugroups.server.handlers import GpuGroupsHandler, NotFoundHandler, OpHandler
from gpugroups.server.websocket import EventsSocket

pytestmark = pytest.mark.timeout(60)


def our_routes(serverapp: Any) -> list[tuple[str, type, dict[str, Any]]]:
    """(path template below the base URL, handler class, kwargs) of every gpugroups route."""
    base = serverapp.base_url.rstrip("/")
    routes = []
    for host_rule in serverapp.web_app.default_router.rules:
        for rule in getattr(host_rule.target, "rules", []):
            handler = rule.target
            if not (isinstance(handler, type) and issubclass(handler, (GpuGroupsHandler, EventsSocket))):
                continue
            pattern = rule.matcher.regex.pattern.rstrip("$")
            assert pattern.startswith(base)
            path = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", pattern[len(base) :])
            routes.append((path, handler, rule.target_kwargs))
    return routes


def methods_of(handler: type, kwargs: dict[str, Any]) -> list[str]:
    if handler is OpHandler:
        return list(kwargs["ops"])
    return [
        m for m in ("GET", "POST") if m.lower() in vars(handler) or (m == "GET" and handler is EventsSocket)
    ]


def concrete(path: str) -> str:
    """A request path for a route template (path parameters filled in)."""
    return re.sub(r"\{\w+\}", "0", path).replace("(.*)", "no/such/route")


async def fetch(jp_fetch: Any, path: str, method: str = "GET", body: Any = None, **kwargs: Any) -> Any:
    if body is not None and not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    if method == "POST" and body is None:
        body = "{}"
    return await jp_fetch(path, method=method, body=body, raise_error=False, **kwargs)


def error_of(response: Any) -> dict[str, Any]:
    assert response.headers["Content-Type"].startswith("application/json"), response.body[:200]
    return json.loads(response.body)["error"]


def assert_documented(spec: dict[str, Any], path: str, method: str, status: int) -> None:
    """The OpenAPI document lists this status for this route (paths are below the base URL)."""
    responses = spec["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path}: {status} not in {sorted(responses)}"


@pytest.fixture
def spec() -> dict[str, Any]:
    from gpugroups.server.openapi import build_spec

    return build_spec("/")


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


async def test_every_route_refuses_a_missing_or_wrong_token(
    jp_serverapp: Any, jp_fetch: Any, spec: dict[str, Any]
) -> None:
    checked = 0
    for path, handler, kwargs in our_routes(jp_serverapp):
        if handler is EventsSocket:
            continue
        for method in methods_of(handler, kwargs) if handler is not NotFoundHandler else ["GET", "POST"]:
            for auth in ("", "token wrong-token"):
                r = await fetch(jp_fetch, concrete(path), method, headers={"Authorization": auth})
                assert r.code == 403, (method, path, auth, r.code)
                assert error_of(r)["code"] == "forbidden"
                checked += 1
            if handler is not NotFoundHandler:
                assert_documented(spec, path, method, 403)
    assert checked >= 4 * len(OPS)


async def browser_login(jp_serverapp: Any, jp_fetch: Any) -> tuple[dict[str, str], str]:
    """Log in through the login form as a browser does: (headers with only the cookies, XSRF token)."""
    login = await jp_fetch("login", raise_error=False, headers={"Authorization": ""}, follow_redirects=False)
    xsrf = re.search(r"_xsrf=([^;]+)", login.headers.get("Set-Cookie", "")).group(1)
    form = f"_xsrf={xsrf}&password={jp_serverapp.identity_provider.token}"
    r = await jp_fetch(
        "login",
        method="POST",
        body=form,
        raise_error=False,
        follow_redirects=False,
        headers={"Authorization": "", "Cookie": f"_xsrf={xsrf}"},
    )
    cookies = "; ".join(c.split(";")[0] for c in r.headers.get_list("Set-Cookie")) + f"; _xsrf={xsrf}"
    return {"Authorization": "", "Cookie": cookies}, xsrf


async def test_cookie_posts_need_xsrf(jp_serverapp: Any, jp_fetch: Any) -> None:
    cookie_only, xsrf = await browser_login(jp_serverapp, jp_fetch)
    # the cookie alone logs in (a GET passes) ...
    assert (await fetch(jp_fetch, API_PREFIX + "/system/host", headers=cookie_only)).code == 200
    # ... but no POST passes without the XSRF token, whatever the route
    for path, handler, kwargs in our_routes(jp_serverapp):
        if "POST" in methods_of(handler, kwargs) or handler is NotFoundHandler:
            r = await fetch(jp_fetch, concrete(path), "POST", headers=cookie_only)
            assert r.code == 403, (path, r.code)
            assert error_of(r)["code"] == "forbidden"
    # with it, the request gets through authentication and reaches the handler's own checks
    r = await fetch(
        jp_fetch, API_PREFIX + "/models/load", "POST", {}, headers={**cookie_only, "X-XSRFToken": xsrf}
    )
    assert r.code == 400 and error_of(r)["code"] == "invalid_request"


async def test_websocket_refuses_missing_token_and_foreign_origin(
    jp_serverapp: Any, jp_fetch: Any, jp_ws_fetch: Any, jp_http_port: int
) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "token wrong-token"}):
        with pytest.raises(HTTPClientError) as exc:
            await jp_ws_fetch(API_PREFIX, "ws", headers=headers)
        assert exc.value.code == 403
    # a browser session (cookie) from a foreign page is refused; from the server's own origin it is not
    cookie_only, _ = await browser_login(jp_serverapp, jp_fetch)
    # the login cookie is named after the host the login went to: jp_fetch's 127.0.0.1
    own = f"http://127.0.0.1:{jp_http_port}"
    url = "ws" + own[4:] + jp_serverapp.base_url + API_PREFIX.lstrip("/") + "/ws"
    with pytest.raises(HTTPClientError) as exc:
        await websocket_connect(HTTPRequest(url, headers={**cookie_only, "Origin": "http://evil.example"}))
    assert exc.value.code == 403
    ws = await websocket_connect(HTTPRequest(url, headers={**cookie_only, "Origin": own}))
    ws.close()


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/models/load", "{not json", "not valid JSON"),
        ("/models/load", "[1, 2]", "JSON object"),
        ("/models/load", {"model_id": 3}, "'model_id' must be a string"),
        ("/models/load", {"model_id": "m", "device": 0}, "unknown field(s) 'device'"),
        ("/models/load", {}, "'model_id' is required"),
        (
            "/models/process",
            {"model_id": "m", "prompt": "x", "num_predictions": "3"},
            "'num_predictions' must be an integer",
        ),
        (
            "/models/process",
            {"model_id": "m", "prompt": "x", "max_new_tokens": 10**6},
            "'max_new_tokens' must be <=",
        ),
        ("/groups/pin", {"group_id": "g", "pinned": "yes"}, "'pinned' must be a boolean"),
        ("/groups/load", {"group_id": "g", "device_id": True}, "'device_id' must be an integer"),
        ("/devices/abc/clear", {}, "'device_id' must be an integer"),
        ("/devices/0/clear", {"device_id": 1}, "given by the path"),
        ("/system/host", {"kernel": "k"}, "kernel_id"),
        ("/system/host", "\xff", "not valid JSON"),
    ],
)
async def test_bad_requests_are_400_json(
    jp_fetch: Any, spec: dict[str, Any], path: str, body: Any, needle: str
) -> None:
    r = await fetch(jp_fetch, API_PREFIX + path, "POST", body)
    assert r.code == 400
    error = error_of(r)
    assert error["code"] == "invalid_request" and needle in error["message"], error
    template = re.sub(r"/devices/\w+/", "/devices/{device_id}/", path)
    assert_documented(spec, API_PREFIX + template, "POST", 400)


async def test_unknown_routes_and_methods_are_json(jp_fetch: Any) -> None:
    r = await fetch(jp_fetch, API_PREFIX + "/no/such/thing")
    assert r.code == 404 and error_of(r)["code"] == "not_found"
    r = await fetch(jp_fetch, API_PREFIX + "/system/state", "POST")
    assert r.code == 405 and error_of(r)["code"] == "method_not_allowed"


async def test_without_host_kernel_answers_503_and_null_host(jp_fetch: Any, spec: dict[str, Any]) -> None:
    r = await fetch(jp_fetch, API_PREFIX + "/system/state")
    assert r.code == 503
    assert error_of(r)["code"] == "host_unavailable" and "gg.serve()" in error_of(r)["message"]
    assert_documented(spec, API_PREFIX + "/system/state", "GET", 503)
    r = await fetch(jp_fetch, API_PREFIX + "/system/host")
    assert json.loads(r.body) == {"kernel_id": None, "subshells": None, "started_by": None}
    r = await fetch(jp_fetch, API_PREFIX + "/system/host", "POST", {"kernel_id": "no-such-kernel"})
    assert r.code == 404 and error_of(r)["code"] == "unknown_kernel"
    assert_documented(spec, API_PREFIX + "/system/host", "POST", 404)


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


async def test_v1_aliases_answer_like_v2_with_deprecation_headers(jp_serverapp: Any, jp_fetch: Any) -> None:
    base = jp_serverapp.base_url.rstrip("/")
    for path, code in (("/system/host", 200), ("/system/state", 503), ("/openapi.json", 200)):
        v1 = await fetch(jp_fetch, LEGACY_PREFIX + path)
        v2 = await fetch(jp_fetch, API_PREFIX + path)
        assert v1.code == v2.code == code
        assert v1.body == v2.body
        assert v1.headers["Deprecation"].startswith("@")
        assert v1.headers["Link"] == f'<{base}{API_PREFIX}{path}>; rel="successor-version"'
        assert "Deprecation" not in v2.headers
