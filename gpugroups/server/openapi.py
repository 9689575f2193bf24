"""The OpenAPI 3.1 description of ``/api/v2`` (and its deprecated ``/api/v1`` aliases).

Built from the ops table (routes, params with their limits, result shapes), and its component
schemas are derived from the TypedDicts of ``schema``, so neither is written twice; the few
routes that are not manager ops (host, this document, the WebSocket) are described below. The
error statuses listed per route are the ones its handler can answer with: the op's own codes,
the bridge's (``host_unavailable``, ``timeout``, ``internal_error``) and Jupyter's refusals.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple

from .. import __version__, schema
from ..errors import HTTP_STATUS
from ..protocol import API_PREFIX, LEGACY_PREFIX, OPS, Op, Param
from ..typeschema import components

#: Codes any route that reaches the host kernel may answer with, beside its op's own.
BRIDGE_ERRORS = ("host_unavailable", "timeout", "internal_error")
#: Refusals raised by Jupyter before a handler runs, with the codes ``handlers.py`` gives them.
REFUSALS = {
    403: "forbidden: not authenticated, not authorized, or a cookie POST without XSRF token",
    404: "not_found: a cookie request from a page of another origin (as every Jupyter REST API answers it)",
}

_REF = "#/components/schemas/"
#: The WebSocket's messages to a client.
_EVENTS = ("SystemStateEvent", "StateUpdateEvent", "LoadProgressEvent", "ErrorEvent")


def component_schemas() -> dict[str, Any]:
    """The document's component schemas, derived from the shapes of ``schema``."""
    return components(schema.COMPONENTS)


def _param_schema(p: Param) -> dict[str, Any]:
    """A param's JSON Schema: type and limits; an optional one may be null (its default)."""
    json_type = "array" if p.type == "integer_list" else p.type
    out: dict[str, Any] = {"type": json_type if p.required else [json_type, "null"]}
    if p.type == "integer_list":
        item = {"type": "integer", "minimum": p.minimum, "maximum": p.maximum}
        out["items"] = {k: v for k, v in item.items() if v is not None}
        out["uniqueItems"] = True
        limits = {"minItems": p.min_length, "maxItems": p.max_length}
    else:
        limits = {"minimum": p.minimum, "maximum": p.maximum, "minLength": p.min_length, "maxLength": p.max_length}
    out.update({k: v for k, v in limits.items() if v is not None})
    if p.default is not None:
        out["default"] = p.default
    description = p.doc + (" null: the default." if not p.required else "")
    if description.strip():
        out["description"] = description.strip()
    return out


def _errors(codes: tuple[str, ...] | list[str], refusals: dict[int, str] = REFUSALS) -> dict[str, Any]:
    """Error responses: one per status, naming every code answered with it, and ``refusals``."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(HTTP_STATUS[code], []).append(code)
    out = {
        str(status): {"description": ", ".join(sorted(set(cs))), "content": _json("Error")}
        for status, cs in sorted(by_status.items())
    }
    for status, why in refusals.items():
        known = out.get(str(status), {}).get("description")
        out[str(status)] = {"description": f"{known}; {why}" if known else why, "content": _json("Error")}
    return out


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF + name}}}


def _operation(op: Op, deprecated: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": op.name + ("_v1" if deprecated else ""),
        "summary": op.summary,
        "description": " ".join(filter(None, (
            f"Calls `Manager.{op.manager_method}` in the host kernel.", op.notes,
            f"Give {' or '.join(op.exclusive)}, not both." if op.exclusive else "",
            "A caller that goes away (disconnects, or gets 504) cancels it in the host." if op.cancellable else "",
        ))),
        "responses": {
            str(op.ok_status): {
                "description": "OK",
                "content": _json(op.result),
            },
            # a POST body may be malformed JSON whatever the op
            **_errors(
                [*op.errors, *BRIDGE_ERRORS, *(["invalid_request"] if op.http_method == "POST" else [])]
            ),
        },
    }
    path_params = [p for p in op.params if p.in_path]
    body_params = [p for p in op.params if not p.in_path]
    if path_params:
        operation["parameters"] = [
            {"name": p.name, "in": "path", "required": True, "schema": _param_schema(p)} for p in path_params
        ]
    if body_params:
        body: dict[str, Any] = {
            "type": "object",
            "additionalProperties": False,
            "required": [p.name for p in body_params if p.required],
            "properties": {p.name: _param_schema(p) for p in body_params},
        }
        if op.exclusive:  # at most one of them given as a value (null is the same as absent)
            body["not"] = {
                "required": list(op.exclusive),
                "properties": {name: {"not": {"type": "null"}} for name in op.exclusive},
            }
        operation["requestBody"] = {
            "required": any(p.required for p in body_params),
            "content": {"application/json": {"schema": body}},
        }
    return operation


def _extra_routes() -> dict[str, dict[str, Any]]:
    """The routes that are not manager ops."""
    from .websocket import MAX_CLIENT_MESSAGE, MAX_OUTBOX  # here: that module serves this document's route

    return {
        "/system/host": {
            "get": {
                "operationId": "get_host",
                "summary": "The host kernel: the one whose manager this API serves.",
                "responses": {"200": {"description": "OK", "content": _json("Host")}, **_errors([])},
            },
            "post": {
                "operationId": "set_host",
                "summary": "Make a running kernel the host (it runs gg.serve()).",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["kernel_id"],
                                "properties": {"kernel_id": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": {"description": "OK", "content": _json("Host")},
                    **_errors(["invalid_request", "unknown_kernel", "conflict", "host_unavailable"]),
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors([]),
                },
            }
        },
        "/ws": {
            "get": {
                "operationId": "events",
                "summary": "WebSocket of events (upgrade).",
                "description": "Server messages: system_state, state_update, load_progress, error "
                '(each described by `x-server-messages`). A client may send {"type": "get_state"}; '
                f"a message over {MAX_CLIENT_MESSAGE} bytes closes the socket (1009), and so does a "
                f"client that leaves more than {MAX_OUTBOX} messages untaken (1008, as one slower than "
                "GpuGroupsHost.ws_send_timeout): it reconnects for the current state.",
                "x-server-messages": {"oneOf": [{"$ref": _REF + name} for name in _EVENTS]},
                "responses": {
                    "101": {"description": "Switching protocols"},
                    # a request that is not a WebSocket upgrade; a page of another origin: 403, not 404
                    **_errors(["invalid_request"], {403: f"{REFUSALS[403]}, or a cookie from a page of another origin"}),
                },
            }
        },
    }


class ServerLimits(NamedTuple):
    """The limits a server enforces by its settings (``GpuGroupsHost``), stated in the document."""

    max_body_bytes: int
    request_timeout: float
    ws_send_timeout: float

    def describe(self) -> str:
        return (
            f"Limits of this server: a request body of at most {self.max_body_bytes} bytes "
            f"(GpuGroupsHost.max_body_bytes; larger: 400 invalid_request); an answer from the host kernel "
            f"within {self.request_timeout:g} s (GpuGroupsHost.request_timeout; then 504 timeout, and a "
            f"process request is cancelled there, as when its client disconnects); a WebSocket client "
            f"takes each message within {self.ws_send_timeout:g} s or is closed (1008; "
            "GpuGroupsHost.ws_send_timeout). Each param's limits are in its schema."
        )


@lru_cache(maxsize=8)
def build_spec(base_url: str = "/", limits: ServerLimits | None = None) -> dict[str, Any]:
    """The OpenAPI document for a server mounted at ``base_url`` with these ``limits`` (cached: it
    never changes for them)."""
    paths: dict[str, dict[str, Any]] = {}
    for prefix, deprecated in ((API_PREFIX, False), (LEGACY_PREFIX, True)):
        for op in OPS.values():
            paths.setdefault(prefix + op.path, {})[op.http_method.lower()] = _operation(op, deprecated)
        for path, methods in _extra_routes().items():
            for method, operation in methods.items():
                if deprecated:
                    operation = {**operation, "operationId": operation["operationId"] + "_v1"}
                paths.setdefault(prefix + path, {})[method] = operation
        if deprecated:
            for methods in (m for p, m in paths.items() if p.startswith(LEGACY_PREFIX)):
                for operation in methods.values():
                    operation["deprecated"] = True
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpugroups",
            "version": __version__,
            "description": "Devices, groups and models of the manager in the host kernel, "
            "behind Jupyter's authentication. "
            "/api/v1 routes are deprecated aliases of /api/v2." + (f" {limits.describe()}" if limits else ""),
        },
        "servers": [{"url": base_url.rstrip("/") or "/"}],
        "security": [{"token": []}],
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "token": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`token <TOKEN>`. A browser's Jupyter login cookie works too; "
                    "its POSTs need the X-XSRFToken header.",
                },
            },
        },
    }
