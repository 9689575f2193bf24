"""Every JSON shape of gpugroups, declared once: the state, the op results, the events and the
bridge envelopes, as TypedDicts.

The manager returns these shapes, ``gg.Client`` is typed with them, and the OpenAPI document's
component schemas are derived from them (``COMPONENTS``, through ``typeschema``), so a field
that is not declared here fails validation. A string in ``Annotated[...]`` is the field's
description; a class docstring is the schema's. Light: no torch (the Jupyter server imports it).
"""

# No ``from __future__ import annotations``: TypedDict reads Required/NotRequired from
# evaluated annotations on Python 3.11.
from typing import Annotated, Any, Literal, NotRequired, TypedDict

# ---- the state JSON -------------------------------------------------------------------------
DeviceKind = Literal["cuda", "cpu", "virtual"]
GroupKind = Literal["adapters", "models", "single"]
ModelRole = Literal["base", "adapter", "model"]
DeviceStatus = Literal["idle", "busy", "loading", "unloading", "lost"]
GroupStatus = Literal["unloaded", "loading", "resident", "in_use", "unloading"]


class Memory(TypedDict):
    """A device's memory in bytes, as placement sees it."""

    total_bytes: int
    used_bytes: Annotated[int, "manager_bytes + other_bytes."]
    free_bytes: Annotated[int, "What placement may still use: the budget left, capped by what the hardware has free."]
    budget_bytes: Annotated[int, "The share of the device gpugroups may fill."]
    manager_bytes: Annotated[int, "Held or reserved by this manager's groups (a group being unloaded no longer counts)."]
    other_bytes: Annotated[int, "Used by the rest of the machine (other processes)."]


class CurrentGroup(TypedDict):
    """The most recently used resident group of a device."""

    id: str
    name: str
    model: Annotated[str | None, "The group's current member."]


class Device(TypedDict):
    """One device the manager places groups on."""

    device_id: int
    device: Annotated[str, "cuda:0, cpu, virtual:1, ..."]
    kind: DeviceKind
    name: str
    memory: Memory
    current_group: CurrentGroup | None
    resident_groups: Annotated[list[str], "Group ids, most recently used first."]
    loaded_models: Annotated[list[str], "Members of the resident groups."]
    status: Annotated[DeviceStatus, "What the device's worker is doing."]
    queue_depth: Annotated[int, "Calls waiting or running on the device."]
    node: NotRequired[Annotated[str, "Ray devices: the id of the Ray node that holds the GPU."]]
    host: NotRequired[Annotated[str, "Ray devices: the address of that node."]]


class Shard(TypedDict):
    """A resident group's share of one device."""

    device_id: int
    bytes: int


class Group(TypedDict):
    """A group of the catalog with its live fields."""

    id: str
    name: str
    kind: GroupKind
    models: Annotated[list[str], "Member model ids."]
    memory_estimate_bytes: Annotated[int, "Bytes the group needs resident (0 when it cannot be estimated)."]
    measured_bytes: Annotated[int | None, "Weights measured at its last load; null before."]
    pinned: bool
    resident_on: Annotated[list[int], "Device ids the resident group spans, in layer order (one unless sharded)."]
    shards: Annotated[list[Shard], "Bytes the resident group holds on each device it spans, in layer order."]
    status: GroupStatus
    current_model: Annotated[str, "The member that load/process use by default."]


class Model(TypedDict):
    """A model of the catalog and where it is loaded."""

    id: str
    group_id: str
    role: ModelRole
    is_loaded: bool
    devices: list[int]


class Operation(TypedDict):
    """A running long operation (a load)."""

    id: str
    op: Literal["load"]
    group_id: str
    device_id: int
    progress: Annotated[float, "0..1."]
    stage: str


class State(TypedDict):
    """The whole state: devices, groups, models, operations."""

    version: Annotated[int, "Bumped by every change."]
    num_devices: int
    devices: list[Device]
    groups: list[Group]
    models: list[Model]
    operations: list[Operation]
    closed: Annotated[bool, "The manager was closed (m.close()): nothing is loaded and every op is refused."]


ModelList = list[Model]
GroupList = list[Group]


# ---- op results ------------------------------------------------------------------------------
class LoadResult(TypedDict):
    """What load and load_group answer."""

    status: Annotated[
        Literal["loaded", "switched", "already_loaded"],
        "loaded: this call loaded the group; switched: the group was resident and the model became its current "
        "member (no memory operation); already_loaded: nothing to do.",
    ]
    model_id: Annotated[str, "The group's current member."]
    group_id: str
    device_id: Annotated[int, "The (first) device the group is on."]
    device_ids: Annotated[list[int], "Every device the group spans, in layer order."]
    seconds: float


class UnloadResult(TypedDict):
    """What unload and unload_group answer."""

    status: Literal["unloaded", "not_loaded"]
    group_id: str
    device_id: Annotated[int | None, "Where it was unloaded; for not_loaded the device asked about."]
    device_ids: NotRequired[Annotated[list[int], "Every device it was unloaded from (unloaded only)."]]


class PinResult(TypedDict):
    """What pin and unpin answer."""

    group_id: str
    device_id: NotRequired[Annotated[int, "Where the pinned group is resident (absent when unpinned)."]]
    device_ids: NotRequired[Annotated[list[int], "Every device the pinned group spans (absent when unpinned)."]]
    pinned: bool


class ClearResult(TypedDict):
    """What clear_device answers."""

    device_id: int
    unloaded: Annotated[list[str], "The group ids unloaded."]


class Prediction(TypedDict):
    """One candidate next token."""

    token: str
    token_id: int
    probability: float
    logprob: float
    text: NotRequired[Annotated[str, "The greedy continuation from this token, with max_new_tokens > 0."]]


class Timing(TypedDict):
    """Where a process call's time went, in milliseconds."""

    batch_size: Annotated[int, "Requests served by the same forward pass."]
    tokenize_ms: float
    forward_ms: float
    total_ms: Annotated[float, "On the device's worker."]
    load_ms: Annotated[float, "Until the group was resident (0-ish when it already was)."]
    request_ms: Annotated[float, "The whole call."]


class ProcessResult(TypedDict):
    """Top-N next-token predictions for a prompt."""

    model_id: str
    group_id: str
    device_id: Annotated[int, "The (first) device the group is on."]
    device_ids: Annotated[list[int], "Every device the group spans, in layer order."]
    prompt: str
    predictions: Annotated[list[Prediction], "Most likely first."]
    prompt_tokens: Annotated[int, "Tokens of the prompt the model saw."]
    truncated: Annotated[bool, "The prompt was cut from the left to fit the model's context."]
    notes: Annotated[list[str], "What was adjusted (a capped num_predictions or max_new_tokens, a truncated prompt)."]
    timing: Timing


# ---- errors and the host ---------------------------------------------------------------------
#: The codes of ``errors.HTTP_STATUS`` (a test keeps the two equal).
ErrorCode = Literal[
    "invalid_request", "invalid_catalog", "invalid_model", "unknown_model", "unknown_group",
    "unknown_device", "unknown_kernel", "forbidden", "method_not_allowed", "not_found", "conflict",
    "load_failed", "host_unavailable", "timeout", "insufficient_memory", "internal_error", "cancelled",
]


class ErrorInfo(TypedDict):
    """An error: a stable code and a human message."""

    code: ErrorCode
    message: str
    details: NotRequired[Annotated[dict[str, Any], "Machine-readable context, e.g. each device's room."]]


class Error(TypedDict):
    """The body of every REST error."""

    error: ErrorInfo


class Host(TypedDict):
    """The host kernel: the one whose manager the API serves."""

    kernel_id: Annotated[str | None, "null: no host attached (yet)."]
    subshells: Annotated[bool | None, "false: the bridge shares the main shell, so it waits for running cells."]
    started_by: Literal["serve", "api", "server"] | None


# ---- events ----------------------------------------------------------------------------------
class SystemStateEvent(TypedDict):
    """The whole state: on connect, on request, and when a new host takes over (with ``host``)."""

    type: Literal["system_state"]
    version: int
    state: State
    host: NotRequired[Host]


class StateUpdateEvent(TypedDict):
    """The whole state after a change."""

    type: Literal["state_update"]
    version: int
    state: State


class LoadProgressEvent(TypedDict):
    """The progress of one running load."""

    type: Literal["load_progress"]
    version: int
    operation_id: str
    group_id: str
    device_id: int
    progress: Annotated[float, "0..1."]
    stage: str


class ErrorEvent(TypedDict):
    """Something went wrong outside any request (the host was lost, a message was not understood)."""

    type: Literal["error"]
    error: ErrorInfo


ManagerEvent = StateUpdateEvent | LoadProgressEvent
Event = SystemStateEvent | StateUpdateEvent | LoadProgressEvent | ErrorEvent


# ---- bridge envelopes (server <-> host kernel, on the comm) ------------------------------------
class OpenData(TypedDict):
    """The server's comm_open data: the protocol it speaks and what it allows."""

    protocol: int
    trust_remote_code: bool
    direct: bool


class BridgeRequest(TypedDict):
    """A request from the server: run op with args."""

    id: str
    op: str
    args: dict[str, Any]


class BridgeCancel(TypedDict):
    """From the server: the caller of request ``cancel`` went away (timed out or disconnected);
    stop it if it has not finished. No answer comes back for it."""

    cancel: str


class ReplyOk(TypedDict):
    """The host's answer to a request that succeeded."""

    id: str
    ok: Literal[True]
    result: Any


class ReplyError(TypedDict):
    """The host's answer to a request that failed."""

    id: str
    ok: Literal[False]
    error: ErrorInfo


class Hello(TypedDict):
    """The host's first message on a new comm."""

    type: Literal["hello"]
    protocol: int
    pid: int
    subshell_id: str | None
    line: str | None


Reply = ReplyOk | ReplyError
HostMessage = ReplyOk | ReplyError | Hello | StateUpdateEvent | LoadProgressEvent


class Batch(TypedDict):
    """Several host messages in one comm message (a coalesced burst)."""

    batch: list[HostMessage]


#: The named shapes: the OpenAPI document's component schemas, and the names ``Op.result`` uses.
COMPONENTS: dict[str, Any] = {
    t.__name__: t
    for t in (
        Memory, CurrentGroup, Device, Shard, Group, Model, Operation, State,
        LoadResult, UnloadResult, PinResult, ClearResult, Prediction, Timing, ProcessResult,
        ErrorInfo, Error, Host,
        SystemStateEvent, StateUpdateEvent, LoadProgressEvent, ErrorEvent,
        OpenData, BridgeRequest, BridgeCancel, ReplyOk, ReplyError, Hello, Batch,
    )
} | {"ModelList": ModelList, "GroupList": GroupList}
