"""Helpers for the tests of the REST and WebSocket routes: the routes the extension registered,
requests that never raise on an error status, and the error body of an answer."""

from __future__ import annotations

import json
import re
from typing import Any

from gpugroups.protocol import API_PREFIX
from gpugroups.server.handlers import GpuGroupsHandler, OpHandler
from gpugroups.server.websocket import EventsSocket


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
    return re.sub(r"\{\w+\}", "0", path).replace("(/.*)?", "/no/such/route")


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


async def post(jp_fetch: Any, path: str, body: dict[str, Any], **kwargs: Any) -> Any:
    """``POST /api/v2/<path>`` with a JSON body; the answer whatever its status."""
    return await jp_fetch(API_PREFIX, path, method="POST", body=json.dumps(body), raise_error=False, **kwargs)


async def read(ws: Any, pred: Any) -> dict[str, Any]:
    """The next message on a socket that satisfies ``pred``."""
    while True:
        message = json.loads(await ws.read_message())
        if pred(message):
            return message
