"""The ops table: every operation declared once for the kernel bridge, REST, the client and the panel.

An ``Op`` names the ``Manager`` method it calls, its REST route, and its parameters with their
types. ``validate`` turns an untrusted argument dict (JSON from REST, a comm message, a widget
message) into keyword arguments or raises ``invalid_request``; ``dispatch`` validates and calls
the manager. Light on purpose: the Jupyter server imports this module, so it imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import GpuGroupsError

API_PREFIX = "/api/v2"
LEGACY_PREFIX = "/api/v1"
COMM_TARGET = "gpugroups.v2"
#: Version of the bridge messages; the server refuses a host that speaks another one.
BRIDGE_PROTOCOL = 1
#: The host record's file name in the Jupyter runtime dir (written by ``gg.serve()``, watched by the server).
HOST_RECORD = "gpugroups-host.json"

#: Limits shared by validation here and by the manager's own checks.
MAX_NUM_PREDICTIONS = 100
MAX_NEW_TOKENS = 256
MAX_PROMPT_CHARS = 100_000


@dataclass(frozen=True)
class Param:
    """One argument of an op: its JSON type, whether it is required, and where REST reads it."""

    name: str
    type: str  # "string" | "integer" | "boolean"
    required: bool = True
    in_path: bool = False
    description: str = ""
    minimum: int | None = None
    maximum: int | None = None

    def check(self, op: str, value: Any) -> Any:
        """Return ``value`` if it has this param's type and range, else raise ``invalid_request``."""
        if self.type == "string":
            ok = isinstance(value, str)
        elif self.type == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, bool)
        if not ok:
            raise GpuGroupsError(
                "invalid_request",
                f"{op}: '{self.name}' must be {_A[self.type]}, got {type(value).__name__}",
            )
        if self.minimum is not None and value < self.minimum:
            raise GpuGroupsError(
                "invalid_request", f"{op}: '{self.name}' must be >= {self.minimum}, got {value}"
            )
        if self.maximum is not None and value > self.maximum:
            raise GpuGroupsError(
                "invalid_request", f"{op}: '{self.name}' must be <= {self.maximum}, got {value}"
            )
        return value


_A = {"string": "a string", "integer": "an integer", "boolean": "a boolean"}


@dataclass(frozen=True)
class Op:
    """An operation: the manager method it calls and the REST route that exposes it."""

    name: str
    http_method: str  # "GET" | "POST"
    path: str  # below API_PREFIX, e.g. "/models/load" or "/devices/{device_id}/clear"
    summary: str
    params: tuple[Param, ...] = ()
    method: str = ""  # Manager method; defaults to ``name``
    mutating: bool = True
    ok_status: int = 200
    errors: tuple[str, ...] = field(default=("invalid_request",))

    @property
    def manager_method(self) -> str:
        """The name of the ``Manager`` method this op calls."""
        return self.method or self.name

    def validate(self, args: Any) -> dict[str, Any]:
        """Check an untrusted argument dict: known fields, right types, required present."""
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise GpuGroupsError(
                "invalid_request", f"{self.name}: arguments must be a JSON object"
            )
        known = {p.name: p for p in self.params}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise GpuGroupsError(
                "invalid_request",
                f"{self.name}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(known) or 'none'}",
            )
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in args and args[p.name] is not None:
                out[p.name] = p.check(self.name, args[p.name])
            elif p.required:
                raise GpuGroupsError("invalid_request", f"{self.name}: '{p.name}' is required")
        return out


_MODEL = Param("model_id", "string", description="A model id from the catalog, a hub id or a local path under the allowed roots.")
_GROUP = Param("group_id", "string", description="A group id from the catalog.")
_DEVICE_OPT = Param("device_id", "integer", required=False, minimum=0, description="Device to use; chosen by placement when absent.")

OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("state", "GET", "/system/state", "The whole state: devices, groups, models, operations.", mutating=False, errors=()),
        Op("models", "GET", "/models", "The catalog's models.", mutating=False, errors=()),
        Op("groups", "GET", "/groups", "The catalog's groups.", mutating=False, errors=()),
        Op(
            "load", "POST", "/models/load", "Make a model current: load its group if needed, switch member.",
            (_MODEL, _DEVICE_OPT),
            errors=("invalid_request", "unknown_model", "unknown_device", "insufficient_memory", "load_failed"),
        ),
        Op(
            "unload", "POST", "/models/unload", "Unload the group that holds a model.",
            (_MODEL, _DEVICE_OPT),
            errors=("invalid_request", "unknown_model", "unknown_device"),
        ),
        Op(
            "load_group", "POST", "/groups/load", "Load a whole group.",
            (_GROUP, _DEVICE_OPT),
            errors=("invalid_request", "unknown_group", "unknown_device", "insufficient_memory", "load_failed"),
        ),
        Op(
            "unload_group", "POST", "/groups/unload", "Unload a group.",
            (_GROUP, _DEVICE_OPT),
            errors=("invalid_request", "unknown_group", "unknown_device"),
        ),
        Op(
            "pin", "POST", "/groups/pin", "Pin a group (load it if needed) or, with pinned=false, unpin it.",
            (_GROUP, _DEVICE_OPT, Param("pinned", "boolean", required=False, description="false unpins; default true.")),
            errors=("invalid_request", "unknown_group", "unknown_device", "insufficient_memory", "load_failed"),
        ),
        Op(
            "unpin", "POST", "/groups/unpin", "Unpin a group; it stays resident but may be evicted.",
            (_GROUP,),
            errors=("invalid_request", "unknown_group"),
        ),
        Op(
            "process", "POST", "/models/process", "Top-N next-token predictions for a prompt.",
            (
                _MODEL,
                Param("prompt", "string", description="The text to continue."),
                Param("num_predictions", "integer", required=False, minimum=1, description=f"How many predictions (default 3; capped at {MAX_NUM_PREDICTIONS})."),
                _DEVICE_OPT,
                Param("max_new_tokens", "integer", required=False, minimum=0, maximum=MAX_NEW_TOKENS, description="Continue each prediction greedily this many tokens (default 0)."),
            ),
            errors=("invalid_request", "unknown_model", "unknown_device", "insufficient_memory", "load_failed"),
        ),
        Op(
            "clear_device", "POST", "/devices/{device_id}/clear", "Unload every unpinned group on a device.",
            (Param("device_id", "integer", in_path=True, minimum=0, description="The device to clear."),),
            errors=("invalid_request", "unknown_device"),
        ),
    )
}


def get_op(name: Any) -> Op:
    """The op called ``name``, or ``invalid_request`` naming the known ones."""
    if not isinstance(name, str) or name not in OPS:
        raise GpuGroupsError(
            "invalid_request", f"unknown op {name!r}; known ops: {', '.join(OPS)}"
        )
    return OPS[name]


def dispatch(manager: Any, op_name: Any, args: Any) -> Any:
    """Validate ``args`` for ``op_name`` and call the manager; errors are ``GpuGroupsError``."""
    op = get_op(op_name)
    kwargs = op.validate(args)
    return getattr(manager, op.manager_method)(**kwargs)


def error_json(exc: BaseException) -> dict[str, Any]:
    """The error body for any exception: its own for ``GpuGroupsError``, ``internal_error`` else."""
    if isinstance(exc, GpuGroupsError):
        return exc.to_json()
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


# ---- bridge envelopes: what the server and the host kernel say on the comm ---------------------
def open_data(trust_remote_code: bool) -> dict[str, Any]:
    """The server's ``comm_open`` data: the protocol it speaks and what it allows."""
    return {"protocol": BRIDGE_PROTOCOL, "trust_remote_code": trust_remote_code}


def request_message(request_id: str, op: str, args: Any) -> dict[str, Any]:
    """A request from the server: run ``op`` with ``args``."""
    return {"id": request_id, "op": op, "args": args}


def reply_message(request_id: str, outcome: Any) -> dict[str, Any]:
    """The host's answer to one request: ``outcome`` is the result, or the exception raised."""
    if isinstance(outcome, BaseException):
        return {"id": request_id, "ok": False, "error": error_json(outcome)}
    return {"id": request_id, "ok": True, "result": outcome}


def hello_message(pid: int, subshell_id: str | None) -> dict[str, Any]:
    """The host's first message on a new comm: its protocol, process and subshell."""
    return {"type": "hello", "protocol": BRIDGE_PROTOCOL, "pid": pid, "subshell_id": subshell_id}


def batch_message(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Several messages in one comm message (a coalesced burst of events)."""
    return items[0] if len(items) == 1 else {"batch": items}


def unbatch(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages in one comm message from the host (undoes ``batch_message``)."""
    items = data.get("batch", [data])
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def is_reply(item: dict[str, Any]) -> bool:
    """Whether a message from the host answers a request (else it is a hello or an event)."""
    return "id" in item and "ok" in item
