"""The OpenAPI 3.1 description of ``/api/v2`` (and its deprecated ``/api/v1`` aliases).

Built from the ops table, so a new op shows up here as it shows up in the routes; the few
routes that are not manager ops (host, this document, the WebSocket) are described below. The
error statuses listed per route are the ones its handler can answer with: the op's own codes,
the bridge's (``host_unavailable``, ``timeout``, ``internal_error``) and Jupyter's refusals.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .. import __version__
from ..errors import HTTP_STATUS
from ..protocol import API_PREFIX, LEGACY_PREFIX, OPS, Op, Param

#: Codes any route that reaches the host kernel may answer with, beside its op's own.
BRIDGE_ERRORS = ("host_unavailable", "timeout", "internal_error")
#: Refusals raised by Jupyter before a handler runs, with the codes ``handlers.py`` gives them.
REFUSALS = {403: "forbidden: not authenticated, not authorized, or a cookie POST without XSRF token"}

#: The result schema of each op (ops not named here answer an ``OpResult``).
RESULT_SCHEMAS = {
    "state": "State",
    "models": "ModelList",
    "groups": "GroupList",
    "load": "LoadResult",
    "load_group": "LoadResult",
    "process": "ProcessResult",
}

_ERROR_CODES = sorted({*HTTP_STATUS, "forbidden", "not_found", "method_not_allowed"})

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": _ERROR_CODES},
                    "message": {"type": "string"},
                    "details": {
                        "type": "object",
                        "description": "Machine-readable context, e.g. each device's room.",
                    },
                },
            }
        },
    },
    "Memory": {
        "type": "object",
        "properties": {
            k: {"type": "integer"} for k in ("total_bytes", "used_bytes", "free_bytes", "budget_bytes")
        },
    },
    "Device": {
        "type": "object",
        "required": ["device_id", "device", "memory", "resident_groups", "status"],
        "properties": {
            "device_id": {"type": "integer"},
            "device": {"type": "string", "examples": ["cuda:0", "cpu", "virtual:1"]},
            "kind": {"type": "string"},
            "name": {"type": "string"},
            "memory": {"$ref": "#/components/schemas/Memory"},
            "current_group": {"type": ["object", "null"]},
            "resident_groups": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Most recent first.",
            },
            "loaded_models": {"type": "array", "items": {"type": "string"}},
            "status": {"type": "string"},
            "is_switching": {"type": "boolean"},
            "queue_depth": {"type": "integer"},
        },
    },
    "Group": {
        "type": "object",
        "required": ["id", "kind", "models"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "kind": {"type": "string", "enum": ["adapters", "models", "single"]},
            "models": {"type": "array", "items": {"type": "string"}},
            "memory_estimate_bytes": {"type": ["integer", "null"]},
            "pinned": {"type": "boolean"},
            "resident_on": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "group_id"],
        "properties": {
            "id": {"type": "string"},
            "group_id": {"type": "string"},
            "role": {"type": "string", "enum": ["base", "adapter", "model"]},
            "is_loaded": {"type": "boolean"},
            "devices": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "State": {
        "type": "object",
        "required": ["version", "num_devices", "devices", "groups", "models", "operations"],
        "properties": {
            "version": {"type": "integer", "description": "Bumped by every change."},
            "num_devices": {"type": "integer"},
            "devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
            "groups": {"type": "array", "items": {"$ref": "#/components/schemas/Group"}},
            "models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
            "operations": {"type": "array", "items": {"type": "object"}},
        },
    },
    "ModelList": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
    "GroupList": {"type": "array", "items": {"$ref": "#/components/schemas/Group"}},
    "LoadResult": {
        "type": "object",
        "required": ["status", "group_id", "device_id"],
        "properties": {
            "status": {"type": "string", "enum": ["loaded", "already_loaded"]},
            "model_id": {"type": "string"},
            "group_id": {"type": "string"},
            "device_id": {"type": "integer"},
            "seconds": {"type": "number"},
        },
    },
    "Prediction": {
        "type": "object",
        "required": ["token", "token_id", "probability", "logprob"],
        "properties": {
            "token": {"type": "string"},
            "token_id": {"type": "integer"},
            "probability": {"type": "number"},
            "logprob": {"type": "number"},
            "text": {"type": "string", "description": "The greedy continuation, with max_new_tokens > 0."},
        },
    },
    "ProcessResult": {
        "type": "object",
        "required": ["model_id", "group_id", "device_id", "prompt", "predictions"],
        "properties": {
            "model_id": {"type": "string"},
            "group_id": {"type": "string"},
            "device_id": {"type": "integer"},
            "prompt": {"type": "string"},
            "predictions": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Prediction"},
                "description": "Most likely first.",
            },
            "timing": {"type": "object"},
            "notes": {"type": "array", "items": {"type": "string"}},
        },
    },
    "OpResult": {"type": "object", "description": "What the manager method returns."},
    "Host": {
        "type": "object",
        "required": ["kernel_id", "subshells", "started_by"],
        "properties": {
            "kernel_id": {"type": ["string", "null"], "description": "null: no host attached (yet)."},
            "subshells": {
                "type": ["boolean", "null"],
                "description": "false: the bridge shares the main shell, so it waits for running cells.",
            },
            "started_by": {"type": ["string", "null"], "enum": ["serve", "api", "server", None]},
        },
    },
}


def _param_schema(p: Param) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": p.type}
    if p.minimum is not None:
        schema["minimum"] = p.minimum
    if p.maximum is not None:
        schema["maximum"] = p.maximum
    if p.description:
        schema["description"] = p.description
    return schema


def _errors(codes: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Error responses: one per status, naming every code answered with it."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(HTTP_STATUS[code], []).append(code)
    out = {
        str(status): {"description": ", ".join(sorted(set(cs))), "content": _json("Error")}
        for status, cs in sorted(by_status.items())
    }
    for status, why in REFUSALS.items():
        out[str(status)] = {"description": why, "content": _json("Error")}
    return out


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


def _operation(op: Op, deprecated: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": op.name + ("_v1" if deprecated else ""),
        "summary": op.summary,
        "description": f"Calls `Manager.{op.manager_method}` in the host kernel.",
        "responses": {
            str(op.ok_status): {
                "description": "OK",
                "content": _json(RESULT_SCHEMAS.get(op.name, "OpResult")),
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
        operation["requestBody"] = {
            "required": any(p.required for p in body_params),
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": [p.name for p in body_params if p.required],
                        "properties": {p.name: _param_schema(p) for p in body_params},
                    }
                }
            },
        }
    return operation


def _extra_routes() -> dict[str, dict[str, Any]]:
    """The routes that are not manager ops."""
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
                "description": "Server messages: system_state, state_update, load_progress, error. "
                'A client may send {"type": "get_state"}.',
                "responses": {"101": {"description": "Switching protocols"}, **_errors([])},
            }
        },
    }


@lru_cache(maxsize=8)
def build_spec(base_url: str = "/") -> dict[str, Any]:
    """The OpenAPI document for a server mounted at ``base_url`` (cached: it never changes)."""
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
            "/api/v1 routes are deprecated aliases of /api/v2.",
        },
        "servers": [{"url": base_url.rstrip("/") or "/"}],
        "security": [{"token": []}],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
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
