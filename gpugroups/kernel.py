"""The host kernel's side of the bridge: ``serve()`` makes this kernel's manager reachable from
the Jupyter server extension (``/api/v2``) through a comm (``gpugroups.v2``) on a kernel subshell.

The server opens the comm and sends ``{id, op, args}``; each request runs in its op's lane
(``Op.lane``): snapshot reads on the subshell itself, forward passes on the ``device`` pool, every
other op on the ``control`` pool, so callers waiting on the device never hold up a switch, pin,
unpin or unload. Each is answered ``{id, ok, result | error}``. ``{cancel: id}`` (the server's
caller of that request went away) is handled at once: ``Manager.cancel``. When the server asks
for it, requests and replies take the comm's direct line instead (``directline``: a socket of
their own, two trips through ipykernel's channels shorter); a reply always goes back the way its
request came. Manager events are pushed on the comm by one sender thread per comm, which
coalesces bursts. Everything on the comm goes straight onto IOPub with a fixed parent (the
``comm_open``), never through ``Comm.send`` (see ``_ipykernel`` for why, and for the other
ipykernel workarounds used here).

``serve()`` also writes the host record (``hostrecord``) that the extension watches, so a notebook
becomes the host without anybody typing a kernel id. Light at import (no torch).
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import _ipykernel
from .directline import KernelLine
from .errors import GpuGroupsError
from .events import Coalescer
from .hostrecord import host_record_path, remove_host_record, write_host_record
from .protocol import COMM_TARGET, OPS, batch_message, get_op, hello_message, reply_message

#: Threads per lane: requests beyond them queue in their lane only.
LANE_WORKERS = {"device": 16, "control": 16}
#: Least seconds between two pushes of events to the server (a lone change goes at once).
PUSH_INTERVAL = 0.01


class Host:
    """This kernel as the host: the comm target, the manager it serves, the open bridges."""

    def __init__(self, kernel: Any, manager: Any) -> None:
        self.kernel = kernel
        self.manager = manager
        self.record_path = host_record_path()
        self.connection_file = _connection_file()
        #: Where a direct line binds: the interface and transport of the kernel's own channels.
        self.interface = _interface(self.connection_file)
        self._endpoints: dict[str, _Endpoint] = {}
        self._lock = threading.Lock()
        self._lanes = {
            lane: ThreadPoolExecutor(n, thread_name_prefix=f"gpugroups-{lane}") for lane, n in LANE_WORKERS.items()
        }

    def open(self, comm: Any, open_msg: dict[str, Any]) -> None:
        """Comm target: a server connected. Runs on the subshell the server opened the comm on."""
        options = open_msg["content"].get("data") or {}
        endpoint = _Endpoint(
            self,
            comm,
            open_msg,
            trust_remote_code=options.get("trust_remote_code") is True,
            direct=options.get("direct") is True,
        )
        with self._lock:
            self._endpoints[comm.comm_id] = endpoint
        _ipykernel.take_comm_messages(comm, endpoint.handle_msg)
        _ipykernel.route_by_header(comm)
        comm.on_close(lambda _msg: self._closed(comm.comm_id))
        endpoint.start()

    def write_record(self) -> None:
        """Tell the server(s) sharing this runtime dir that this kernel is the host (last one wins)."""
        try:
            write_host_record(self.record_path, self.connection_file)
        except OSError as exc:  # still a host, only not found by itself
            warnings.warn(
                f"gg.serve(): could not write the host record {self.record_path} ({exc}); "
                "name this kernel with POST /api/v2/system/host instead",
                stacklevel=3,
            )

    def remove_record(self) -> None:
        """Withdraw the record if it is still this kernel's (at exit)."""
        remove_host_record(self.record_path)

    def set_manager(self, manager: Any) -> None:
        """Serve ``manager`` from now on; connected servers follow it (a fresh ``state_update``)."""
        with self._lock:
            if manager is self.manager:
                return
            self.manager = manager
            endpoints = list(self._endpoints.values())
        for endpoint in endpoints:
            endpoint.follow(manager)

    @property
    def connected(self) -> int:
        """How many server bridges are connected."""
        with self._lock:
            return len(self._endpoints)

    def submit(self, lane: str, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on a thread of ``lane``'s pool."""
        self._lanes[lane].submit(fn, *args)

    def _closed(self, comm_id: str) -> None:
        with self._lock:
            endpoint = self._endpoints.pop(comm_id, None)
        if endpoint:
            endpoint.stop()

    def __repr__(self) -> str:
        return (
            f"<gpugroups host: this kernel (pid {os.getpid()}) serves /api/v2 of its Jupyter server; "
            f"{self.connected} server bridge(s) attached>"
        )


class _Endpoint:
    """One server's comm: runs its requests, pushes the manager's events, sends with a fixed parent."""

    def __init__(
        self, host: Host, comm: Any, open_msg: dict[str, Any], trust_remote_code: bool, direct: bool
    ) -> None:
        self.host = host
        self.comm = comm
        self.open_msg = open_msg
        self.trust_remote_code = trust_remote_code
        # One sender per comm sends the events, bursts coalesced (trap 4: keep chatter low).
        # at most one batch of events per PUSH_INTERVAL: a burst of state changes (each carries
        # the whole state) must not queue up faster than the server reads IOPub
        self._out = Coalescer(self._send_events, name="gpugroups-bridge-send", interval=PUSH_INTERVAL)
        self._unsubscribe: Any = None
        self._line = KernelLine(host.kernel.session, self.handle, *host.interface) if direct else None

    def start(self) -> None:
        self._unsubscribe = self._events_of(self.host.manager)
        header = self.open_msg["header"]
        line = self._line.address if self._line else None
        self._out.offer(hello_message(os.getpid(), header.get("subshell_id"), line))

    def follow(self, manager: Any) -> None:
        """Push ``manager``'s events instead of the previous one's, starting with its whole state
        as a ``system_state``: its versions start again, and clients must start from it."""
        self._unsubscribe()
        self._unsubscribe = self._events_of(manager)
        state = manager.state()
        self._out.offer({"type": "system_state", "version": state["version"], "state": state})

    def _events_of(self, manager: Any) -> Callable[[], None]:
        """Subscribe to ``manager``'s events; a closed one has none left, and is still served
        (its state says ``closed``, its ops answer that the manager is closed)."""
        try:
            return manager.subscribe(self._out.offer)  # type: ignore[no-any-return]
        except GpuGroupsError:
            return lambda: None

    def stop(self) -> None:
        if self._unsubscribe:
            self._unsubscribe()
        self._out.stop(flush=True)
        if self._line:
            self._line.stop()

    def handle_msg(self, msg: dict[str, Any]) -> None:
        """A comm message from the server (on the subshell): answered on the comm."""
        self.handle(msg["content"].get("data"), self.publish)

    def handle(self, data: Any, answer: Callable[[Mapping[str, Any]], None]) -> None:
        """A request from the server, on the thread it came in on (the subshell, or the direct
        line's): reads (quick snapshots) are answered there, so they never queue behind loads;
        everything else goes to its lane's pool (an unknown op to ``control``, which answers its
        error). ``answer`` sends the reply back the way the request came."""
        if isinstance(data, dict) and isinstance(data.get("cancel"), str):
            self.host.manager.cancel(data["cancel"])
            return
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            return  # not a bridge request: nobody to answer
        name = data.get("op")
        op = OPS.get(name) if isinstance(name, str) else None
        lane = op.lane if op is not None else "control"
        if lane == "inline":
            self._run(data, answer)
            return
        try:
            self.host.submit(lane, self._run, data, answer)
        except RuntimeError:  # the pools refuse work once the interpreter shuts down
            answer(reply_message(data["id"], _stopping()))

    def _run(self, request: dict[str, Any], answer: Callable[[Mapping[str, Any]], None]) -> None:
        try:
            outcome: Any = self._call(request["id"], request.get("op"), request.get("args"))
        except Exception as exc:  # every request gets an answer, whatever went wrong
            outcome = exc if threading.main_thread().is_alive() else _stopping()
        # Straight out from this pool thread (IOPub's socket is thread-safe; the direct line
        # queues it for its thread): a reply never waits behind a large state push, and it
        # needs no order with the events.
        answer(reply_message(request["id"], outcome))

    def _call(self, request_id: str, op_name: Any, args: Any) -> Any:
        op = get_op(op_name)
        kwargs = op.validate(args)
        if op.may_load and not self.trust_remote_code:
            self._refuse_remote_code(kwargs)
        if op.cancellable:  # the bridge's id names it to a later ``{cancel: id}``
            kwargs["request_id"] = request_id
        return getattr(self.host.manager, op.manager_method)(**kwargs)

    def _refuse_remote_code(self, kwargs: dict[str, Any]) -> None:
        catalog = self.host.manager.catalog
        group = (
            catalog.group(kwargs["group_id"])
            if "group_id" in kwargs
            else catalog.group_of(kwargs["model_id"])
        )
        if group.trust_remote_code:
            raise GpuGroupsError(
                "invalid_request",
                f"group {group.id!r} needs trust_remote_code, which this Jupyter server does not allow "
                "(set GpuGroupsHost.trust_remote_code = True, or load it from a notebook)",
            )

    def _send_events(self, items: list[Mapping[str, Any]]) -> None:
        self.publish(batch_message(items))

    def publish(self, data: Mapping[str, Any]) -> None:
        """Send ``data`` on the comm (IOPub), from any thread."""
        _ipykernel.publish_comm_msg(self.host.kernel, self.comm, data, parent=self.open_msg)


def _stopping() -> GpuGroupsError:
    """The answer to a request the kernel cannot finish because it is shutting down or restarting
    (its main thread has ended: whatever failed, failed for that reason)."""
    return GpuGroupsError("host_unavailable", "the host kernel is shutting down (restart or shutdown)")


_host: Host | None = None
_host_lock = threading.Lock()


def serve(manager: Any) -> Host:
    """Make this kernel the host behind ``/api/v2``, serving ``manager``; calling again is harmless.

    Registers the comm target and writes the host record; the extension attaches within a second
    (or on the next request). Must run inside an ipykernel kernel.
    """
    global _host
    kernel = _current_kernel()
    with _host_lock:
        if _host is None:
            _host = Host(kernel, manager)
            kernel.comm_manager.register_target(COMM_TARGET, _host.open)
            atexit.register(_host.remove_record)
        _host.set_manager(manager)
        _host.write_record()
        return _host


def ensure_served() -> Host:
    """What the server runs in a kernel it attaches: keep the manager already served (a notebook's
    ``gg.serve(m)``), else serve this kernel's ``gg.manager()``."""
    with _host_lock:
        if _host is not None:
            return _host
    from . import manager

    return serve(manager())


def _current_kernel() -> Any:
    outside = GpuGroupsError(
        "invalid_request", "gg.serve() must run inside a Jupyter kernel (ipykernel), e.g. in a notebook cell"
    )
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:
        raise outside from None
    if not Kernel.initialized():
        raise outside
    return Kernel.instance()


def _interface(connection_file: str) -> tuple[str, str]:
    """The (ip, transport) of the kernel's channels, from its connection file."""
    from ipykernel.connect import get_connection_info

    info: Any = get_connection_info(connection_file, unpack=True)
    return str(info.get("ip") or "127.0.0.1"), str(info.get("transport") or "tcp")


def _connection_file() -> str:
    from ipykernel.connect import get_connection_file

    return str(Path(get_connection_file()).resolve())
