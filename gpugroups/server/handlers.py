"""REST handlers: parse, authorize, ask the host policy, write JSON. Routes come from the ops table.

Every verb is ``@web.authenticated`` + ``@authorized`` on resource ``gpugroups``; cookie POSTs need
XSRF (jupyter_server's ``APIHandler`` checks it). Verbs raise; ``JsonErrors.write_error`` renders
every failure once, as a JSON body ``{"error": {"code", "message"}}`` with the code's status, never
an HTML page (the WebSocket's refusals too). ``/api/v1/...``
answers like ``/api/v2/...`` with ``Deprecation`` and ``Link: rel="successor-version"`` headers.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, cast

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from tornado import web

from ..errors import GpuGroupsError
from ..protocol import API_PREFIX, LEGACY_PREFIX, OPS, Op, encodable, parse_json
from .host import GpuGroupsHost
from .openapi import ServerLimits, build_spec

AUTH_RESOURCE = "gpugroups"
#: When /api/v1 was deprecated (RFC 9745 ``Deprecation: @<epoch seconds>``): the day /api/v2
#: replaced it, in gpugroups 0.1.0.
V1_DEPRECATED_AT = 1795651200  # 2026-11-26T00:00:00Z

#: Codes for refusals that tornado or jupyter_server raise before our code runs.
_CODE_BY_STATUS = {400: "invalid_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
#: What such a refusal means, where it comes with no message of its own.
_SAID_BY_STATUS = {
    403: "send the server's token (Authorization: token <token>, or ?token= in the URL), or from a "
    "browser session the _xsrf cookie's value as X-XSRFToken",
}


class JsonErrors:
    """Every failure of a gpugroups route (REST or the WebSocket's upgrade) as ``{"error": {"code",
    "message"}}`` with the code's status, never an HTML page: a ``GpuGroupsError`` with its own
    code, tornado's and jupyter_server's refusals by their status (a cross-origin cookie request is
    refused with 404, as every Jupyter REST API does, and the message says why), anything else as
    ``internal_error`` (its traceback goes to the server log). Mixed into tornado handlers."""

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        """A ``GpuGroupsError`` that a verb raised is answered with its code's status, not 500."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GpuGroupsError):
            status_code = exc.http_status
        super().send_error(status_code, **kwargs)  # type: ignore[misc]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        handler = cast(JupyterHandler, self)
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GpuGroupsError):
            error = exc
        elif isinstance(exc, web.HTTPError):
            code = _CODE_BY_STATUS.get(status_code, "internal_error")
            said = "; ".join(filter(None, (exc.log_message, _SAID_BY_STATUS.get(status_code))))
            error = GpuGroupsError(code, said or exc.reason or handler._reason)
            if status_code == 405:  # RFC 9110: say what is allowed
                allowed = ", ".join(handler.SUPPORTED_METHODS)
                handler.set_header("Allow", allowed)
                error = GpuGroupsError(code, f"{handler.request.method} is not allowed here; allowed: {allowed}")
            if status_code == 404 and not handler.check_origin():
                origin = handler.request.headers.get("Origin", "")
                error = GpuGroupsError(
                    "not_found", f"cross-origin request from {origin} refused (not in ServerApp.allow_origin); "
                    "Jupyter answers such requests with 404",
                )
        else:
            error = GpuGroupsError("internal_error", "unexpected server error (see the server log)")
        handler.set_header("Content-Type", "application/json; charset=UTF-8")
        handler.finish(json.dumps({"error": error.to_json()}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """A ``GpuGroupsError`` is an answer, not a server fault: one line, no traceback."""
        if isinstance(value, GpuGroupsError):
            handler = cast(JupyterHandler, self)
            handler.log.debug("%d %s: %s", value.http_status, handler._request_summary(), value)
        else:
            super().log_exception(typ, value, tb)  # type: ignore[misc]


class Legacy:
    """``/api/v1`` routes (``deprecated``): ``Deprecation`` and ``Link: rel="successor-version"``
    headers on every answer, error pages too. Mixed into tornado handlers, REST and WebSocket."""

    deprecated = False

    def initialize(self, deprecated: bool = False) -> None:
        self.deprecated = deprecated
        self._deprecation_headers()

    def _deprecation_headers(self) -> None:
        if not self.deprecated:
            return
        handler = cast(JupyterHandler, self)
        base = handler.base_url.rstrip("/")
        successor = base + API_PREFIX + handler.request.path[len(base) + len(LEGACY_PREFIX) :]
        handler.set_header("Deprecation", f"@{V1_DEPRECATED_AT}")
        handler.set_header("Link", f'<{successor}>; rel="successor-version"')


@web.stream_request_body
class GpuGroupsHandler(Legacy, JsonErrors, APIHandler):
    """Base of the REST handlers: JSON errors, the host policy, deprecation headers on ``/api/v1``.

    Bodies are read as they stream in (``prepare``, ``data_received``), so that what would be
    refused anyway is refused before it is read: a caller who is not logged in (403) and a body
    over ``GpuGroupsHost.max_body_bytes`` (400); one that does not say its length stops being
    read at the limit.
    """

    auth_resource = AUTH_RESOURCE
    _body: bytes | bytearray = b""

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.request.method not in ("POST", "PUT", "PATCH", "DELETE"):
            return
        if not self.current_user:
            raise web.HTTPError(403)
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.host.max_body_bytes:
            raise self._too_large(int(length))
        self.request.connection.set_max_body_size(self.host.max_body_bytes)  # type: ignore[union-attr]
        self._body = bytearray()

    def data_received(self, chunk: bytes) -> None:
        self._body += chunk

    def _too_large(self, size: int) -> GpuGroupsError:
        return GpuGroupsError(
            "invalid_request",
            f"the body has {size} bytes; at most {self.host.max_body_bytes} are accepted "
            "(GpuGroupsHost.max_body_bytes)",
        )

    @property
    def host(self) -> GpuGroupsHost:
        host: GpuGroupsHost = self.settings["gpugroups_host"]
        return host

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self._deprecation_headers()  # error pages call this again after clearing the headers

    def answer(self, result: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(result))

    def json_body(self) -> Any:
        """The request body as JSON (an empty body is ``{}``); ``invalid_request`` if it isn't JSON
        or is larger than ``GpuGroupsHost.max_body_bytes``."""
        if not self._body:
            return {}
        if len(self._body) > self.host.max_body_bytes:
            raise self._too_large(len(self._body))
        return parse_json(bytes(self._body))


class OpHandler(GpuGroupsHandler):
    """One route of the ops table: ``{method: op}`` at one path; path parameters join the body."""

    def initialize(self, ops: dict[str, Op], deprecated: bool = False) -> None:  # type: ignore[override]
        self.ops = ops
        self.SUPPORTED_METHODS = (*ops, "OPTIONS")  # others: 405
        self._waiting: asyncio.Future[Any] | None = None
        super().initialize(deprecated)

    def on_connection_close(self) -> None:
        """The client went away: stop waiting, which cancels its request in the host (if it can be)."""
        if self._waiting is not None:
            self._waiting.cancel()

    @web.authenticated
    @authorized
    async def get(self, **path_args: str) -> None:
        await self._run(path_args)

    @web.authenticated
    @authorized
    async def post(self, **path_args: str) -> None:
        await self._run(path_args)

    async def _run(self, path_args: dict[str, str]) -> None:
        op = self.ops[self.request.method or "GET"]
        args = self.json_body() if op.http_method == "POST" else {}
        if args is None:  # a JSON null body: no arguments, as an empty one
            args = {}
        if isinstance(args, dict):
            clash = sorted(set(args) & set(path_args))
            if clash:
                raise GpuGroupsError("invalid_request", f"{op.name}: {', '.join(clash)} is given by the path")
            args.update({k: _path_value(op, k, v) for k, v in path_args.items()})
        self._waiting = asyncio.ensure_future(self.host.request(op.name, args))
        try:
            result = await self._waiting
        except asyncio.CancelledError:
            return  # nobody to answer
        self.answer(result, op.ok_status)


class HostHandler(GpuGroupsHandler):
    """``GET`` the host kernel's ``{kernel_id, subshells, started_by}``; ``POST {kernel_id}`` switches it."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.answer(self.host.host_info())

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        if (
            not isinstance(body, dict) or set(body) != {"kernel_id"} or not isinstance(body["kernel_id"], str)
            or not encodable(body["kernel_id"])
        ):
            raise GpuGroupsError("invalid_request", 'the body must be {"kernel_id": "<id of a running kernel>"}')
        self.answer(await self.host.set_host(body["kernel_id"]))


class OpenAPIHandler(GpuGroupsHandler):
    """``GET /openapi.json``: the OpenAPI 3.1 description of every route here."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        host = self.host
        limits = ServerLimits(host.max_body_bytes, host.request_timeout, host.ws_send_timeout)
        self.answer(build_spec(self.base_url, limits))


class NotFoundHandler(GpuGroupsHandler):
    """Anything else under the API prefixes, the prefixes themselves included, with any method: a
    JSON 404 rather than the server's HTML page or a 405."""

    @web.authenticated
    @authorized
    def get(self, *_: str) -> None:
        raise GpuGroupsError("not_found", f"no route {self.request.method} {self.request.path}")

    post = put = delete = patch = head = get
    options = get  # type: ignore[assignment]  # APIHandler answers OPTIONS with 200 on any path


def _path_value(op: Op, name: str, text: str) -> Any:
    """A path part in its param's type: an integer only from ASCII digits, signed or not
    (``str.isdigit`` also takes ``²`` and ``١``), so the param's check names its range; anything
    else stays text, which the param's check then refuses."""
    param = next(p for p in op.params if p.name == name)
    if param.type == "integer" and re.fullmatch(r"-?[0-9]{1,64}", text):
        return int(text)
    return text


def path_pattern(path: str) -> str:
    """A route template's tornado pattern: ``/devices/{device_id}/clear`` -> named groups."""
    return re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)


def _rest_routes() -> list[tuple[str, type[GpuGroupsHandler], dict[str, Any]]]:
    by_path: dict[str, dict[str, Op]] = {}
    for op in OPS.values():
        by_path.setdefault(op.path, {})[op.http_method] = op
    routes: list[tuple[str, type[GpuGroupsHandler], dict[str, Any]]] = []
    for prefix, deprecated in ((API_PREFIX, False), (LEGACY_PREFIX, True)):
        for path, ops in by_path.items():
            routes.append((prefix + path_pattern(path), OpHandler, {"ops": ops, "deprecated": deprecated}))
        routes.append((prefix + "/system/host", HostHandler, {"deprecated": deprecated}))
        routes.append((prefix + "/openapi.json", OpenAPIHandler, {"deprecated": deprecated}))
    for prefix, deprecated in ((API_PREFIX, False), (LEGACY_PREFIX, True)):
        routes.append((prefix + "(/.*)?", NotFoundHandler, {"deprecated": deprecated}))
    return routes


#: REST routes, v2 then the deprecated v1 aliases, the JSON 404s last (first match wins).
default_handlers = _rest_routes()
