"""Ray devices: every GPU of a Ray cluster as a device, each reached through its ``DeviceActor``.

``ray_devices`` joins the cluster and gets or creates one detached, named actor per GPU resource
(so a new manager in the namespace adopts what an earlier one left); ``RayWorker`` implements the
``Worker`` protocol over that actor: prompts go on the actor's direct line (``rayline``), the other
calls as Ray tasks, all numbered in the order sent (the actor keeps that order); the answers come
back as ``concurrent.futures.Future``s, load progress streams back from the node. Ray does the
scheduling, the other calls and failure detection: a worker whose actor stops answering or whose
line breaks (its node died) turns ``"lost"``, fails what it had pending with ``host_unavailable``
naming the node, and tells residency.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from ..kernelenv import RAY_ADDRESS_ENV
from .calls import Held, Progress, Request, Span
from .devices import Device, parse_size
from .rayactor import ACTOR_OPTIONS, DeviceActor, seal
from .rayclaim import Claim
from .rayline import Address, open_line
from .remote import Outcome, RemoteCalls, pack_run, result_of

#: How often a worker pings its actor (also the actor's sign that a manager is attached).
PING_S = 1.0
#: An actor that has not answered for this long is lost, even before Ray declares it dead.
LOST_AFTER_S = 5.0
#: How long the actors may take to start (a GPU held by another namespace's actor never frees).
READY_S = 60.0


def connect() -> None:
    """Join the running cluster: ``$GPUGROUPS_RAY_ADDRESS``, else ``auto``; nothing if Ray is up already."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get(RAY_ADDRESS_ENV) or "auto", log_to_driver=False)


@functools.cache
def _actor_class() -> Any:
    return ray.remote(**ACTOR_OPTIONS)(DeviceActor)


def ray_devices(spec: str, namespace: str = "gpugroups", idle_timeout_s: float = 1800.0) -> list[Device]:
    """One device per GPU resource of every live node: ``"ray"`` (the GPU itself) or
    ``"ray:virtual:SIZE"`` (a virtual device of SIZE whose tensors live on the node's CPU)."""
    m = re.fullmatch(r"ray(?::virtual:(.+))?", spec.strip(), re.I)
    if not m:
        raise GpuGroupsError("invalid_request", f"bad Ray device spec {spec!r}; expected ray or ray:virtual:SIZE")
    size = parse_size(m.group(1)) if m.group(1) else 0
    kind = "virtual" if size else "cuda"
    if not namespace or not isinstance(namespace, str):
        raise GpuGroupsError("invalid_request", "ray_namespace must be a non-empty string")
    if not idle_timeout_s > 0:
        raise GpuGroupsError("invalid_request", "ray_idle_timeout_s must be positive")
    connect()
    nodes = sorted(
        (n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= 1),
        key=lambda n: (n["NodeManagerAddress"], n["NodeID"]),
    )
    if not nodes:
        raise GpuGroupsError("unknown_device", "the Ray cluster has no node with a GPU resource")
    claim = Claim(namespace)  # ``conflict`` while another manager drives the namespace
    try:
        ready = _start(nodes, kind, size, namespace, idle_timeout_s)
    except BaseException:
        claim.drop()
        raise
    devices = []
    for actor, info in ready:
        total = size or info["total_bytes"]
        name = f"{'virtual ' + format(size / 1024**3, '.2f') + ' GiB' if size else info['name']} on {info['host']}"
        d = Device(
            0, "ray", kind, name, total, total, "cpu" if size else "cuda:0", info["supports_bf16"],
            node=info["node"], host=info["host"], claim=claim,
        )
        d.remote_worker = functools.partial(RayWorker, actor=actor, idle_timeout_s=idle_timeout_s, line=info.get("line"))
        devices.append(d)
    return devices


def _start(
    nodes: list[dict[str, Any]], kind: str, size: int, namespace: str, idle_timeout_s: float
) -> list[tuple[Any, dict[str, Any]]]:
    """Get or make the device actor of every GPU of ``nodes``; each ready one with its ``info()``
    (those of a node going away are left out). Refused (``host_unavailable``) when the actors do
    not start in time or none starts: the actors this call made are killed first, so none of them
    takes a GPU later with no manager to drive it (an actor that was there before, and may hold a
    manager's groups for adoption, is left as it is)."""
    actors: list[Any] = []
    made: list[int] = []
    for n in nodes:
        for k in range(int(n["Resources"]["GPU"])):
            name = f"{kind}-{n['NodeID'][:16]}-{k}"
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                made.append(len(actors))  # none of that name yet: this call makes it
            actors.append(_actor_class().options(
                name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                num_gpus=1, num_cpus=0,  # a CPU per actor would starve small nodes of actors
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(kind, size, idle_timeout_s))
    refs = [a.info.remote() for a in actors]
    deadline = time.monotonic() + READY_S
    ready: list[tuple[Any, dict[str, Any]]] = []
    failed: list[BaseException] = []
    try:
        for actor, ref in zip(actors, refs):
            try:
                ready.append((actor, ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))))
            except GetTimeoutError as exc:
                raise GpuGroupsError(
                    "host_unavailable",
                    f"the Ray device actors did not start within {READY_S:.0f} s: are the GPUs held by actors of "
                    "another namespace or of another kind (ray vs ray:virtual)? Close that manager first.",
                ) from exc
            except RayError as exc:  # its node is going away (still listed alive for a moment): not a device
                failed.append(exc)
                _kill(actor)  # nor a name left behind for the next manager
        if not ready:
            cause = f" ({type(failed[0]).__name__}: {str(failed[0]).strip().splitlines()[-1]})" if failed else ""
            raise GpuGroupsError("host_unavailable", f"no Ray device actor started on the cluster's GPU nodes{cause}")
    except BaseException:
        for i in made:
            _kill(actors[i])
        raise
    return ready


def _kill(actor: Any) -> None:
    """End a device actor for good (no restart, its name free again)."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass  # gone already, or its node is, and the actor with it


class RayWorker(RemoteCalls):
    """The ``Worker`` of a Ray device: its ``DeviceActor`` on the node does the work.

    One actor holds one GPU, so a group is never sharded over Ray devices: ``load_sharded`` and
    ``pause`` refuse with ``insufficient_memory``. ``run`` sends ``fn`` and its arguments to the
    node packed (``remote.pack``: cloudpickle) and brings the result back with its tensors on the CPU.
    ``line`` is where the actor's direct line listens (its ``info()["line"]``): prompts go there,
    or over Ray calls when it is None or cannot be opened.
    """

    def __init__(self, device: Device, actor: Any, idle_timeout_s: float, line: Address | None = None) -> None:
        super().__init__(device)
        self._actor = actor
        self._idle = idle_timeout_s
        self._caller = uuid.uuid4().hex  # this worker's calls are numbered apart from another manager's
        self._sent = 0
        self._sending = threading.Lock()  # numbers the calls, over Ray and on the line alike
        self._stopping = threading.Event()
        self._on_line: dict[int, Future[Any]] = {}  # number -> a call sent on the line, until answered
        self._line = open_line(line, self._caller, self._line_answer, self._line_broken)
        threading.Thread(target=self._watch, name=f"gpugroups-ray-{device.device}", daemon=True).start()

    def load(self, group: GroupSpec, folders: Mapping[str, Path], dtype: str, progress: Progress) -> Future[int]:
        fut = self._track("loading")
        if fut.done():
            return fut
        # submitted here, so it keeps its place among this worker's calls
        stream = self._send(self._actor.load.options(num_returns="streaming"), group, dict(folders), dtype)

        def consume() -> None:
            try:
                for ref in stream:
                    item = ray.get(ref)
                    if item[0] == "progress":
                        progress(item[1], item[2])
                    else:
                        self._settle(fut, item)
            except BaseException as exc:
                self._settle(fut, exc)

        threading.Thread(target=consume, name=f"gpugroups-ray-load-{group.id}", daemon=True).start()
        return fut

    def load_sharded(
        self, group: GroupSpec, folders: Mapping[str, Path], dtype: str, progress: Progress, span: Span
    ) -> Future[list[tuple[int, int]]]:
        return self._unshardable(group.id)

    def pause(self, release: Future[Any], ended: Future[None] | None = None) -> Future[None]:
        if ended is not None:
            ended.set_result(None)
        return self._unshardable(None)

    def run(
        self, group_id: str, member_id: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
        after: tuple[Future[None], ...] = (),  # always empty: no group is sharded over Ray devices
    ) -> Future[Any]:
        # bytes: a payload the node cannot rebuild fails there as our error, after its turn
        blob = pack_run(fn, args, kwargs)
        if isinstance(blob, Future):
            return blob
        return self._call("busy", lambda: self._send(self._actor.run, group_id, member_id, blob), packed=True)

    def unload(self, group_id: str) -> Future[None]:
        return self._call("unloading", lambda: self._send(self._actor.unload, group_id))

    def process(self, group_id: str, request: Request) -> Future[dict[str, Any]]:
        if self._line is None:
            return self._call("busy", lambda: self._send(self._actor.process, group_id, request))
        fut = self._track("busy")
        if not fut.done():
            self._send_on_line(fut, "process", group_id, request)
        return fut

    def cancel(self, request_id: str) -> None:
        """Forwarded to the actor at once, after the request it cancels; nothing to wait for."""
        if self._lost is None and not self._closed:
            if self._line is None:
                self._send(self._actor.cancel, request_id)
            else:
                self._send_on_line(None, "cancel", request_id)

    def keep(self, group_id: str, pinned: bool) -> None:
        """Told to the actor, in its turn: a manager that adopts the group pins it again."""
        if self._lost is None and not self._closed:
            try:
                self._send(self._actor.keep, group_id, pinned)
            except Exception:
                pass  # the actor cannot be reached: its device is being lost, and its groups with it

    def resident(self) -> dict[str, Held]:
        if self._lost is not None:
            return {}
        try:
            held: dict[str, Held] = ray.get(self._actor.resident.remote(), timeout=READY_S)
        except (GetTimeoutError, RayError):  # its node died, or is dying: nothing to adopt there
            self._lose()
            return {}
        return held

    def stop(self) -> None:
        """Unload what the actor holds and end it (the manager is closing)."""
        self._stopping.set()
        with self._lock:
            self._closed = True
        if self._lost is None:
            try:
                ray.get(self._send(self._actor.shutdown), timeout=60)
            except Exception:
                pass  # gone already or stuck: the kill below ends it either way
        if self._line is not None:
            self._line.close()
        _kill(self._actor)  # a lost one too: its name must not outlive the manager

    # ---- plumbing ---------------------------------------------------------------------------
    def _send(self, method: Any, *args: Any) -> Any:
        """``method.remote(seal(caller, number, *args))``: numbered and sent as one step, so the
        numbers follow the order sent; a call that fails to go takes no number."""
        with self._sending:
            ref = method.remote(seal(self._caller, self._sent, *args))
            self._sent += 1
        return ref

    def _send_on_line(self, fut: Future[Any] | None, op: str, *args: Any) -> None:
        """As ``_send``, on the line; ``fut`` (None for a call without an answer) is settled by its
        answer, or at once when the line is down."""
        assert self._line is not None
        with self._sending:
            if fut is not None:
                self._on_line[self._sent] = fut
            try:
                self._line.send(self._sent, op, *args)
            except Exception as exc:  # down (the reader then loses the device), or a payload that cannot travel
                if fut is not None:
                    del self._on_line[self._sent]
                    self._settle(fut, self._unavailable(exc) if isinstance(exc, (OSError, ValueError)) else exc)
                return
            self._sent += 1

    def _line_answer(self, number: int, answer: Outcome) -> None:
        fut = self._on_line.pop(number, None)
        if fut is not None:
            self._settle(fut, answer)

    def _line_broken(self) -> None:
        """The line ended while in use: the actor, or its node, is gone."""
        self._lose()
        self._on_line.clear()  # failed by ``_lose``

    def _call(self, status: str, submit: Callable[[], Any], packed: bool = False) -> Future[Any]:
        """A pending call standing for ``status``, settled from the outcome of the task ``submit``
        sends (``packed``: a ``run`` outcome) by whichever comes first: its waiter or Ray's callback."""
        reply = _Reply(lambda got: self._answer(reply, got, packed))
        self._track(status, reply)
        if not reply.done():
            try:
                reply.ref = submit()
            except Exception as exc:  # the actor handle is unusable (Ray left, or the actor is gone)
                self._settle(reply, exc)
                return reply
            reply.ref.future().add_done_callback(lambda r: self._answer(reply, r.exception() or r.result(), packed))
        return reply

    def _answer(self, fut: Future[Any], got: bytes | BaseException, packed: bool) -> None:
        """Settle a call from what Ray gave for it (the actor's pickled outcome, or Ray's error), once
        (a ``run`` outcome's payload unpacked here)."""
        if fut.done():
            return
        if isinstance(got, BaseException):
            self._settle(fut, got)
        else:
            answer = pickle.loads(got)
            self._settle(fut, result_of(*answer) if packed else answer)

    def _unshardable(self, group_id: str | None) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_exception(GpuGroupsError(
            "insufficient_memory",
            f"group {group_id!r} would need sharding over Ray devices, which holds one GPU each; "
            "load it on one device that can hold it" if group_id else "Ray devices take no part in a sharded group",
            {"group_id": group_id, "device_id": self.device.device_id},
        ))
        return fut

    def _settle(self, fut: Future[Any], result: Outcome | BaseException) -> None:
        """As ``RemoteCalls._settle``; a Ray error saying the actor is gone fails the call ``host_unavailable``."""
        super()._settle(fut, self._unavailable(result) if isinstance(result, RayActorError) else result)

    def _unavailable(self, cause: BaseException | None = None) -> GpuGroupsError:
        d = self.device
        why = f": {type(cause).__name__}" if cause is not None else ""
        return GpuGroupsError(
            "host_unavailable", f"Ray node {d.host} ({(d.node or '')[:8]}) of device {d.device_id} is unavailable{why}",
            {"device_id": d.device_id, "node": d.node, "host": d.host},
        )

    def _watch(self) -> None:
        """Ping the actor: it keeps the actor's idle clock at zero and notices a dead node."""
        failing_since: float | None = None
        while not self._stopping.is_set():
            if not ray.is_initialized():
                return  # this process left the cluster; a call now would join it again
            try:
                ray.get(self._actor.ping.remote(self._idle), timeout=2 * PING_S)
                failing_since = None
                self._stopping.wait(PING_S)
                continue
            except ActorDiedError:
                pass
            except (GetTimeoutError, RayActorError):
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since < LOST_AFTER_S:
                    self._stopping.wait(PING_S)
                    continue
            except Exception:
                if self._stopping.is_set() or not ray.is_initialized():
                    return
                self._stopping.wait(PING_S)
                continue
            self._lose()
            return


class _Reply(Future[Any]):
    """The future of one call to the actor. A thread that waits on it (``result``, ``exception``)
    waits in ``ray.get`` and settles it from there: Ray wakes that thread itself once the answer is
    in, a thread hand-off sooner than its completion callback (which costs up to a millisecond a
    call on a busy machine). The callback still settles the calls nobody waits on."""

    def __init__(self, answer: Callable[[bytes | BaseException], None]) -> None:
        super().__init__()
        self.ref: Any = None  # the task's ObjectRef, once sent
        self._answer = answer

    def result(self, timeout: float | None = None) -> Any:
        return super().result(self._fetch(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._fetch(timeout))

    def _fetch(self, timeout: float | None) -> float | None:
        """Wait in Ray for the answer and settle with it; in slices of ``PING_S``, so that a loss
        declared meanwhile (it fails the future) ends the wait. Answers what is left of ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done() and self.ref is not None and ray.is_initialized():  # else ray.get would start a Ray
            left = PING_S if deadline is None else min(PING_S, deadline - time.monotonic())
            if left <= 0:
                break
            try:
                got = ray.get(self.ref, timeout=left)
            except GetTimeoutError:
                continue
            except RayError as exc:  # the actor is gone, or the answer could not be read
                got = exc
            self._answer(got)
        return None if deadline is None else max(0.0, deadline - time.monotonic())
