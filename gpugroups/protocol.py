"""The ops table: every operation declared once for the kernel bridge, REST, the client and the panel.

An ``Op`` names the ``Manager`` method it calls, its REST route, its parameters with their types
and limits, its result (a shape of ``schema``) and its nature: ``slow`` (run off the request
thread), ``may_load`` (may load a group: the remote-code policy applies), ``changes_residency``,
``device_bound`` (waits for forward passes: its own lane in the host kernel).
Every edge reads these facts from here: ``validate`` turns an untrusted argument dict (JSON from REST, a comm message, a widget
message) into keyword arguments or raises ``invalid_request``; ``dispatch`` validates and calls
the manager. The bridge envelopes are built here too. Light on purpose: the Jupyter server imports this module, so it imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import GpuGroupsError
from .schema import BridgeCancel, BridgeRequest, ErrorInfo, Hello, OpenData, Reply

API_PREFIX = "/api/v2"
LEGACY_PREFIX = "/api/v1"
COMM_TARGET = "gpugroups.v2"
#: Version of the bridge messages; the server refuses a host that speaks another one.
BRIDGE_PROTOCOL = 2
#: The host record's file name in the Jupyter runtime dir (written by ``gg.serve()``, watched by the server).
HOST_RECORD = "gpugroups-host.json"

#: Limits shared by validation here and by the manager's own checks.
MAX_NUM_PREDICTIONS = 100
MAX_NEW_TOKENS = 256
MAX_PROMPT_CHARS = 100_000
#: The one rule for a count above its limit (``Param.cap``): lowered, never refused, and said.
CAP_RULE = "Above {cap} it is lowered to {cap} and the result's notes say so."
#: Longest model or group id (a hub id, a catalog id or a local path: Linux's PATH_MAX).
MAX_ID_CHARS = 4096
#: Highest device index a request may name: far above what one manager drives (a Ray cluster's
#: GPUs included), and declared so that every id a schema allows is one the edges read as a number.
MAX_DEVICE_ID = 4095
#: Default of ``Manager(max_request_work=...)``: the token positions of one forward pass of the
#: reference batch the runtime reserve is sized for (``engine.estimate``: 8 rows of 512 tokens; a
#: test keeps them equal), so a request within it also fits the memory placement set aside for it.
MAX_REQUEST_WORK = 8 * 512
#: The one rule for a request's cost (``request_work``), quoted by the OpenAPI document.
WORK_RULE = (
    "A request's work is the token positions the device computes: prompt_tokens (after truncation "
    "to the model's context), plus num_predictions × (prompt_tokens + max_new_tokens) when it "
    f"generates (max_new_tokens > 0). Above the host manager's max_request_work (default {MAX_REQUEST_WORK}) "
    "it is refused with invalid_request naming both."
)


def request_work(prompt_tokens: int, num_predictions: int, max_new_tokens: int) -> int:
    """A ``process`` request's work (``WORK_RULE``): the first pass over the prompt, and each
    prediction's greedy continuation over the prompt and its new tokens."""
    if max_new_tokens <= 0:
        return prompt_tokens
    return prompt_tokens + num_predictions * (prompt_tokens + max_new_tokens)


def check_work(prompt_tokens: int | None, num_predictions: int, max_new_tokens: int, max_work: int | None) -> None:
    """``invalid_request`` if the request's work is over ``max_work`` (None: no limit).
    ``prompt_tokens`` None: the prompt is not tokenized yet, and one token is the least it can have
    (a request over the limit even so is refused before its group is loaded)."""
    tokens = 1 if prompt_tokens is None else prompt_tokens
    work = request_work(tokens, num_predictions, max_new_tokens)
    if max_work is not None and work > max_work:
        least, prompt = ("at least ", "with a one-token prompt") if prompt_tokens is None else (
            "", f"prompt {tokens} tokens"
        )
        raise GpuGroupsError(
            "invalid_request",
            f"process: this request costs {least}{work} units of work ({prompt}, num_predictions "
            f"{num_predictions}, max_new_tokens {max_new_tokens}); the limit is {max_work} "
            "(Manager(max_request_work=...)): ask for fewer predictions, fewer new tokens or a shorter prompt",
            {"work": work, "max_request_work": max_work, "prompt_tokens": tokens},
        )


ParamType = Literal["string", "integer", "boolean", "integer_list"]
_A = {"string": "a string", "integer": "an integer", "boolean": "a boolean", "integer_list": "a list of integers"}


@dataclass(frozen=True)
class Param:
    """One argument of an op: its JSON type and limits, whether it is required, where REST reads it.

    An optional param may be sent as null, which means its ``default``. An integer may be sent as
    an integral number such as ``3.0`` (JSON Schema counts it as an integer too).
    """

    name: str
    type: ParamType
    required: bool = True
    in_path: bool = False
    description: str = ""
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    #: Larger values are lowered to this (and the result's notes say so), not refused.
    cap: int | None = None
    min_length: int | None = None
    max_length: int | None = None

    @property
    def doc(self) -> str:
        """The description with the capping rule spelled out (what OpenAPI and the docs show)."""
        if self.cap is None:
            return self.description
        return f"{self.description} {CAP_RULE.format(name=self.name, cap=self.cap)}".strip()

    def check(self, op: str, value: Any) -> Any:
        """``value`` in this param's type (``3.0`` becomes ``3``), or ``invalid_request``."""
        if self.type == "integer_list":
            if not isinstance(value, list):
                raise _invalid(op, f"'{self.name}' must be {_A[self.type]}, got {type(value).__name__}")
            value = [self._integer(op, v) for v in value]
            if len(set(value)) != len(value):
                raise _invalid(op, f"'{self.name}' must not repeat an item, got {value}")
        elif self.type == "integer":
            value = self._integer(op, value)
        elif not isinstance(value, str if self.type == "string" else bool):
            raise _invalid(op, f"'{self.name}' must be {_A[self.type]}, got {type(value).__name__}")
        if self.min_length is not None and len(value) < self.min_length:
            raise _invalid(op, f"'{self.name}' must not be empty" if self.min_length == 1
                           else f"'{self.name}' must have at least {self.min_length} characters")
        if self.max_length is not None and len(value) > self.max_length:
            raise _invalid(op, f"'{self.name}' must have at most {self.max_length} characters, got {len(value)}")
        if self.type == "string" and not encodable(value):
            raise _invalid(op, f"'{self.name}' is not valid Unicode text (it holds an unpaired surrogate)")
        return value

    def _integer(self, op: str, value: Any) -> int:
        """``value`` as an integer within this param's range (``3.0`` becomes ``3``), or ``invalid_request``."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid(op, f"'{self.name}' must be {_A[self.type]}, got {type(value).__name__}")
        if self.minimum is not None and value < self.minimum:
            raise _invalid(op, f"'{self.name}' must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise _invalid(op, f"'{self.name}' must be <= {self.maximum}, got {value}")
        return value

    def to_json(self) -> dict[str, Any]:
        """The param's facts for the panel (which reads its limits from here, not from constants)."""
        fields = ("type", "required", "default", "minimum", "maximum", "cap", "min_length", "max_length")
        return {k: getattr(self, k) for k in fields}


def encodable(text: str) -> bool:
    """Whether ``text`` can travel as UTF-8 (JSON allows ``"\\ud800"``, UTF-8 does not): the one
    rule every edge applies to strings, so none reaches a kernel message it would break."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(text: str | bytes, what: str = "the body") -> Any:
    """Untrusted JSON text as a value, or ``invalid_request``: also for nesting too deep to parse
    (Python's parser recurses), which must never become a server error."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GpuGroupsError("invalid_request", f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise GpuGroupsError("invalid_request", f"{what} is nested too deeply") from None


def _invalid(op: str, message: str) -> GpuGroupsError:
    return GpuGroupsError("invalid_request", f"{op}: {message}")


@dataclass(frozen=True)
class Op:
    """An operation: the manager method it calls, its REST route, its params, result and nature."""

    name: str
    http_method: Literal["GET", "POST"]
    path: str  # below API_PREFIX, e.g. "/models/load" or "/devices/{device_id}/clear"
    summary: str
    result: str  # a name in schema.COMPONENTS
    params: tuple[Param, ...] = ()
    #: Runs off the request thread (a bridge pool, an ``a``-twin); else a cheap read of a snapshot.
    slow: bool = True
    #: May load a group, hence run its code: refused for remote-code groups unless allowed.
    may_load: bool = False
    #: Its purpose is to change what is resident or pinned (the panel holds its residency
    #: buttons while one runs). ``process`` may load as a side effect and does not count.
    changes_residency: bool = False
    #: Its purpose is a forward pass: it waits for the device's worker (see ``lane``).
    device_bound: bool = False
    method: str = ""  # Manager method; defaults to ``name``
    ok_status: int = 200
    errors: tuple[str, ...] = field(default=("invalid_request",))
    #: What else the op's callers must know (its limits), for the OpenAPI description.
    notes: str = ""
    #: Params of which at most one may be given (not null) in one request.
    exclusive: tuple[str, ...] = ()

    @property
    def manager_method(self) -> str:
        """The name of the ``Manager`` method this op calls."""
        return self.method or self.name

    @property
    def cancellable(self) -> bool:
        """A caller that goes away (a REST timeout or disconnect) cancels it: a forward pass that
        nobody will read must not hold the device (``Manager.cancel``)."""
        return self.device_bound

    @property
    def lane(self) -> Literal["inline", "device", "control"]:
        """Where the host kernel runs it: ``inline`` on the bridge's subshell (a snapshot read),
        ``device`` (it waits for forward passes) or ``control`` (everything else), so a switch, pin,
        unpin or unload never queues behind forward passes."""
        if not self.slow:
            return "inline"
        return "device" if self.device_bound else "control"

    def validate(self, args: Any) -> dict[str, Any]:
        """Check an untrusted argument dict: known fields, right types and limits, required present.

        Returns the keyword arguments for the manager method; a null or missing optional param
        takes its ``default`` here, or is left out when it declares none (the method's applies).
        """
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise _invalid(self.name, "arguments must be a JSON object")
        known = {p.name: p for p in self.params}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise _invalid(
                self.name,
                f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(known) or 'none'}",
            )
        out: dict[str, Any] = {}
        for p in self.params:
            if args.get(p.name) is not None:
                out[p.name] = p.check(self.name, args[p.name])
            elif p.required:
                raise _invalid(self.name, f"'{p.name}' is required")
            elif p.default is not None:
                out[p.name] = p.default
        given = [name for name in self.exclusive if name in out]
        if len(given) > 1:
            raise _invalid(self.name, f"give {' or '.join(given)}, not both")
        return out

    def apply_caps(self, kwargs: dict[str, Any]) -> list[str]:
        """Lower each value in ``kwargs`` that is above its param's ``cap``; the notes that say so."""
        notes = []
        for p in self.params:
            if p.cap is not None and isinstance(kwargs.get(p.name), int) and kwargs[p.name] > p.cap:
                notes.append(f"{p.name} {kwargs[p.name]} capped at {p.cap}")
                kwargs[p.name] = p.cap
        return notes

    def to_json(self) -> dict[str, Any]:
        """The op's facts for the panel: its nature and its params' limits."""
        return {
            "slow": self.slow,
            "may_load": self.may_load,
            "changes_residency": self.changes_residency,
            "device_bound": self.device_bound,
            "params": {p.name: p.to_json() for p in self.params},
        }


_MODEL = Param(
    "model_id", "string", min_length=1, max_length=MAX_ID_CHARS,
    description="A model id from the catalog, a hub id or a local path under the allowed roots.",
)
_GROUP = Param("group_id", "string", min_length=1, max_length=MAX_ID_CHARS, description="A group id from the catalog.")
_DEVICE_IDS = Param(
    "device_ids", "integer_list", required=False, minimum=0, maximum=MAX_DEVICE_ID, min_length=1,
    description="Shard the group over exactly these devices, in layer order (not with device_id).",
)
_DEVICE_OPT = Param(
    "device_id", "integer", required=False, minimum=0, maximum=MAX_DEVICE_ID,
    description="Device to use; chosen by placement when absent.",
)
#: One device, or a span of devices: not both.
_PLACES = ("device_id", "device_ids")
#: A load may also meet a group pinned to another device (``conflict``).
_LOAD_ERRORS = ("invalid_request", "unknown_model", "unknown_device", "conflict", "insufficient_memory", "load_failed")
_GROUP_LOAD_ERRORS = ("invalid_request", "unknown_group", "unknown_device", "conflict", "insufficient_memory", "load_failed")

OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("state", "GET", "/system/state", "The whole state: devices, groups, models, operations.", "State",
           slow=False, errors=()),
        Op("models", "GET", "/models", "The catalog's models.", "ModelList", slow=False, errors=()),
        Op("groups", "GET", "/groups", "The catalog's groups.", "GroupList", slow=False, errors=()),
        Op("load", "POST", "/models/load", "Make a model current: load its group if needed, switch member.",
           "LoadResult", (_MODEL, _DEVICE_OPT, _DEVICE_IDS), may_load=True, changes_residency=True, errors=_LOAD_ERRORS,
           exclusive=_PLACES),
        Op("unload", "POST", "/models/unload", "Unload the group that holds a model.", "UnloadResult",
           (_MODEL, _DEVICE_OPT), changes_residency=True,
           errors=("invalid_request", "unknown_model", "unknown_device")),
        Op("load_group", "POST", "/groups/load", "Load a whole group.", "LoadResult",
           (_GROUP, _DEVICE_OPT, _DEVICE_IDS), may_load=True, changes_residency=True, errors=_GROUP_LOAD_ERRORS,
           exclusive=_PLACES),
        Op("unload_group", "POST", "/groups/unload", "Unload a group.", "UnloadResult",
           (_GROUP, _DEVICE_OPT), changes_residency=True,
           errors=("invalid_request", "unknown_group", "unknown_device")),
        Op("pin", "POST", "/groups/pin", "Pin a group (load it if needed) or, with pinned=false, unpin it.",
           "PinResult",
           (_GROUP, _DEVICE_OPT,
            Param("pinned", "boolean", required=False, default=True, description="false unpins."), _DEVICE_IDS),
           may_load=True, changes_residency=True, errors=_GROUP_LOAD_ERRORS, exclusive=_PLACES),
        Op("unpin", "POST", "/groups/unpin", "Unpin a group; it stays resident but may be evicted.", "PinResult",
           (_GROUP,), changes_residency=True, errors=("invalid_request", "unknown_group")),
        Op("process", "POST", "/models/process", "Top-N next-token predictions for a prompt.", "ProcessResult",
           (
               _MODEL,
               Param("prompt", "string", min_length=1, max_length=MAX_PROMPT_CHARS,
                     description="The text to continue."),
               Param("num_predictions", "integer", required=False, default=3, minimum=1, cap=MAX_NUM_PREDICTIONS,
                     description="How many predictions."),
               _DEVICE_OPT,
               Param("max_new_tokens", "integer", required=False, default=0, minimum=0, cap=MAX_NEW_TOKENS,
                     description="Continue each prediction greedily this many tokens."),
           ),
           may_load=True, device_bound=True, errors=(*_LOAD_ERRORS, "cancelled"), notes=WORK_RULE),
        Op("clear_device", "POST", "/devices/{device_id}/clear", "Unload every unpinned group on a device.",
           "ClearResult", (Param("device_id", "integer", in_path=True, minimum=0, maximum=MAX_DEVICE_ID,
                                 description="The device to clear."),),
           changes_residency=True, errors=("invalid_request", "unknown_device")),
    )
}


def ops_json() -> dict[str, Any]:
    """Every op's facts for the panel (``Panel.spec``): ``{op: {slow, may_load, changes_residency, params}}``."""
    return {name: op.to_json() for name, op in OPS.items()}


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


def error_json(exc: BaseException) -> ErrorInfo:
    """The error body for any exception: its own for ``GpuGroupsError``, ``internal_error`` else."""
    if isinstance(exc, GpuGroupsError):
        return exc.to_json()
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


# ---- bridge envelopes: what the server and the host kernel say on the comm ---------------------
def open_data(trust_remote_code: bool, direct: bool) -> OpenData:
    """The server's ``comm_open`` data: the protocol it speaks, what it allows, and whether it
    wants requests on a direct line (``directline``)."""
    return {"protocol": BRIDGE_PROTOCOL, "trust_remote_code": trust_remote_code, "direct": direct}


def request_message(request_id: str, op: str, args: dict[str, Any]) -> BridgeRequest:
    """A request from the server: run ``op`` with ``args``."""
    return {"id": request_id, "op": op, "args": args}


def cancel_message(request_id: str) -> BridgeCancel:
    """The server's word that the caller of ``request_id`` went away: stop that request."""
    return {"cancel": request_id}


def reply_message(request_id: str, outcome: Any) -> Reply:
    """The host's answer to one request: ``outcome`` is the result, or the exception raised."""
    if isinstance(outcome, BaseException):
        return {"id": request_id, "ok": False, "error": error_json(outcome)}
    return {"id": request_id, "ok": True, "result": outcome}


def hello_message(pid: int, subshell_id: str | None, line: str | None) -> Hello:
    """The host's first message on a new comm: its protocol, process, subshell and the address of
    its direct line (None when the server did not ask for one)."""
    return {"type": "hello", "protocol": BRIDGE_PROTOCOL, "pid": pid, "subshell_id": subshell_id, "line": line}


def batch_message(items: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Several messages in one comm message (a coalesced burst of events)."""
    return items[0] if len(items) == 1 else {"batch": list(items)}


def unbatch(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages in one comm message from the host (undoes ``batch_message``)."""
    items = data.get("batch", [data])
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def is_reply(item: dict[str, Any]) -> bool:
    """Whether a message from the host answers a request (else it is a hello or an event)."""
    return "id" in item and "ok" in item
