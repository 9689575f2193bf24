"""The REST handlers without a host kernel: auth refusals, XSRF, bad requests, unknown routes and
methods, v1 aliases; every failure a JSON error rendered once by ``write_error``.

pytest-jupyter's in-process server with ``host_kernel = "none"``, so no kernel ever starts here:
a bad request must be refused before anything would reach a kernel.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gpugroups.protocol import API_PREFIX, LEGACY_PREFIX, OPS
from gpugroups.server.handlers import NotFoundHandler
from gpugroups.server.websocket import EventsSocket

from .routes import assert_documented, browser_login, concrete, error_of, fetch, methods_of, our_routes

pytestmark = pytest.mark.timeout(60)


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
                assert "token" in error_of(r)["message"], error_of(r)  # says what is missing
                checked += 1
            if handler is not NotFoundHandler:
                assert_documented(spec, path, method, 403)
    assert checked >= 4 * len(OPS)


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


async def test_a_cookie_request_from_a_foreign_page_is_a_json_404_as_in_jupyter(
    jp_serverapp: Any, jp_fetch: Any, spec: dict[str, Any]
) -> None:
    """Jupyter answers a cookie request whose Origin is not allowed with 404 on every REST API
    (``/api/kernels`` too); gpugroups' routes do the same, in their JSON shape, saying why."""
    cookie_only, xsrf = await browser_login(jp_serverapp, jp_fetch)
    foreign = {**cookie_only, "X-XSRFToken": xsrf, "Origin": "http://evil.example"}
    assert (await fetch(jp_fetch, "/api/kernels", headers=foreign)).code == 404
    for path, method in ((API_PREFIX + "/system/state", "GET"), (API_PREFIX + "/models/unload", "POST")):
        r = await fetch(jp_fetch, path, method, {"model_id": "x"} if method == "POST" else None, headers=foreign)
        assert r.code == 404, (path, r.code)
        error = error_of(r)
        assert error["code"] == "not_found" and "cross-origin" in error["message"]
        assert_documented(spec, path, method, 404)


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
            {"model_id": "m", "prompt": "x", "max_new_tokens": -1},
            "'max_new_tokens' must be >= 0",
        ),
        ("/groups/pin", {"group_id": "g", "pinned": "yes"}, "'pinned' must be a boolean"),
        ("/groups/load", {"group_id": "g", "device_id": True}, "'device_id' must be an integer"),
        ("/devices/abc/clear", {}, "'device_id' must be an integer"),
        ("/devices/0/clear", {"device_id": 1}, "given by the path"),
        ("/system/host", {"kernel": "k"}, "kernel_id"),
        ("/system/host", "\xff", "not valid JSON"),
        ("/models/load", "[" * 100_000, "nested too deeply"),
        ("/models/load", '{"model_id": ' + "[" * 100_000, "nested too deeply"),
        ("/models/process", {"model_id": "m", "prompt": "\ud800"}, "unpaired surrogate"),
        ("/groups/unpin", {"group_id": "a\udc80b"}, "unpaired surrogate"),
        ("/devices/%C2%B2/clear", {}, "'device_id' must be an integer"),
        ("/devices/%D9%A1/clear", {}, "'device_id' must be an integer"),
        ("/devices/-1/clear", {}, "'device_id' must be >= 0"),
        ("/devices/12345678901234567890/clear", {}, "'device_id' must be <= 4095"),
        ("/models/load", {"model_id": "x" * 3_000_000}, "GpuGroupsHost.max_body_bytes"),
        ("/system/host", {"kernel_id": "\ud800"}, "kernel_id"),
    ],
)
async def test_bad_requests_are_400_json(
    jp_fetch: Any, spec: dict[str, Any], path: str, body: Any, needle: str
) -> None:
    r = await fetch(jp_fetch, API_PREFIX + path, "POST", body)
    assert r.code == 400
    error = error_of(r)
    assert error["code"] == "invalid_request" and needle in error["message"], error
    template = re.sub(r"/devices/[^/]+/", "/devices/{device_id}/", path)
    assert_documented(spec, API_PREFIX + template, "POST", 400)


async def test_unknown_routes_and_methods_are_json(jp_fetch: Any) -> None:
    for path, method in (
        ("/no/such/thing", "GET"), ("", "GET"), ("/no/such/thing", "PUT"), ("/nosuch", "DELETE"), ("/nosuch", "OPTIONS"),
    ):
        r = await fetch(jp_fetch, API_PREFIX + path, method, body="{}" if method == "PUT" else None)
        assert r.code == 404 and error_of(r)["code"] == "not_found", (path, method)
    r = await fetch(jp_fetch, LEGACY_PREFIX)  # the old prefix itself: a JSON 404 that points to v2
    assert r.code == 404 and error_of(r)["code"] == "not_found" and r.headers["Deprecation"].startswith("@")
    r = await fetch(jp_fetch, API_PREFIX + "/system/state", "POST")
    assert r.code == 405 and error_of(r)["code"] == "method_not_allowed"
    assert r.headers["Allow"] == "GET, OPTIONS" and "allowed: GET" in error_of(r)["message"]


async def test_a_null_body_is_no_arguments_and_the_path_still_counts(jp_fetch: Any) -> None:
    r = await fetch(jp_fetch, API_PREFIX + "/devices/0/clear", "POST", body="null")
    assert r.code == 503 and error_of(r)["code"] == "host_unavailable"  # valid: only the host is missing


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
