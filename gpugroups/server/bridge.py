"""The server's side of the kernel bridge: find (or start) the one host kernel, talk to its manager
over a comm on a kernel subshell, fan its events out, notice when it dies.

A ``HostConnection`` is one attached kernel: a kernel client from the server's own kernel manager,
a subshell, and the ``gpugroups.v2`` comm; requests ``{id, op, args}`` go out on the subshell and
replies ``{id, ok, result | error}`` come back on IOPub next to the pushed events. The ``Bridge``
owns at most one connection at a time and decides which kernel is the host: the one a notebook
named with ``gg.serve()`` (its host record), one chosen by ``POST /system/host``, or one it starts
itself on first use. A watchdog checks the host's process a few times a second, so requests fail
with ``host_unavailable`` right after the host dies instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable
from queue import Empty
from typing import Any

from ..errors import GpuGroupsError
from ..kernel import host_record_path, read_host_record
from ..protocol import BRIDGE_PROTOCOL, COMM_TARGET, get_op, is_reply, open_data, request_message, unbatch

Listener = Callable[[dict[str, Any]], None]

#: Run in a kernel to make it the host; idempotent, and it leaves no names in the user's namespace.
SERVE_CODE = "__import__('gpugroups.kernel').kernel.ensure_served()"
#: Seconds between two looks at the host's process and at the host record.
WATCH_INTERVAL = 0.25
#: IOPub subscriptions have no welcome message: re-ask ``kernel_info`` this often until it shows.
_IOPUB_PROBE_INTERVAL = 0.5
#: Seconds to wait for a control reply before asking again (doubling for subshells, up to 8x).
_CONTROL_RETRY = 0.5
#: Seconds a kernel that stops being the host gets to close the bridge's comm and subshell.
_TIDY_TIMEOUT = 2.0


def host_unavailable(message: str) -> GpuGroupsError:
    return GpuGroupsError("host_unavailable", message)


def _kernel_pid(kernel: Any) -> int | None:
    """A kernel's process id as the server's kernel manager knows it (None if it cannot tell)."""
    return getattr(getattr(kernel, "provisioner", None), "pid", None)


class HostConnection:
    """One attached host kernel: its channels, subshell and comm, pending requests and readers."""

    def __init__(
        self,
        kernel_manager: Any,
        kernel_id: str,
        started_by: str,
        on_data: Callable[[HostConnection, dict[str, Any]], None],
        on_broken: Callable[[HostConnection, str], None],
        trust_remote_code: bool = False,
        use_subshells: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        self.started_by = started_by
        self.kernel = kernel_manager.get_kernel(kernel_id)
        self.subshell_id: str | None = None
        self.comm_id = uuid.uuid4().hex
        self.pid: int | None = None
        self.closed = False
        self._on_data = on_data
        self._on_broken = on_broken
        self._trust_remote_code = trust_remote_code
        self._use_subshells = use_subshells
        self._log = log or logging.getLogger(__name__)
        self._client: Any = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._shell_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._iopub_waiters: dict[str, asyncio.Future[None]] = {}
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self._control_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        #: What ``attach`` is waiting for now: named in its errors and in the server's debug log.
        self.step = "connecting"

    @property
    def subshells(self) -> bool:
        """Whether the comm lives on a subshell (else on the main shell: it waits for running cells)."""
        return self.subshell_id is not None

    def info(self) -> dict[str, Any]:
        """``{kernel_id, subshells, started_by}`` as ``GET /system/host`` shows it."""
        return {"kernel_id": self.kernel_id, "subshells": self.subshells, "started_by": self.started_by}

    # ---- attaching ------------------------------------------------------------------------
    async def attach(self, timeout: float) -> None:
        """Connect, open a subshell, make the kernel serve, open the comm; ``host_unavailable`` on
        failure, at once if the kernel dies or restarts meanwhile. Only ``timeout`` bounds a live
        kernel: its first ``serve()`` loads torch, which can take a while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        process = _kernel_pid(self.kernel)
        steps = asyncio.ensure_future(self._attach())
        try:
            while True:
                done, _ = await asyncio.wait({steps}, timeout=WATCH_INTERVAL)
                if done:
                    return steps.result()
                if not await self.kernel.is_alive():
                    raise host_unavailable(
                        f"kernel {self.kernel_id} died before it became the host ({self.step})"
                    )
                if _kernel_pid(self.kernel) != process:  # what we sent went to the process before
                    raise host_unavailable(
                        f"kernel {self.kernel_id} restarted before it became the host ({self.step})"
                    )
                if loop.time() > deadline:
                    raise host_unavailable(
                        f"kernel {self.kernel_id} did not become the host within {timeout:g} s "
                        f"(stuck {self.step})"
                    )
        except BaseException:
            steps.cancel()
            await self.close("attach failed")
            raise

    async def _attach(self) -> None:
        # Our own session id, hence our own identity on the kernel's shell and control sockets:
        # they hand a shared identity over to whoever connected last (ipykernel sets
        # ROUTER_HANDOVER), so a client made with the kernel manager's session would lose its
        # replies to, or steal them from, any other such client.
        session = self.kernel.session.clone()
        session.session = uuid.uuid4().hex
        self._client = self.kernel.client(session=session)
        self._client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=True)
        self._tasks = [
            asyncio.create_task(self._read_iopub()),
            asyncio.create_task(self._read_shell()),
        ]
        self._at("waiting for the kernel's IOPub (kernel_info on control)")
        info = await self._iopub_ready()
        if self._use_subshells and "kernel subshells" in info.get("supported_features", []):
            self._at("creating a subshell")
            self.subshell_id = await self._create_subshell()
        self._at("running gg.serve() in the kernel")
        served = await self._shell_request(
            "execute_request",
            {
                "code": SERVE_CODE,
                "silent": True,
                "store_history": False,
                "allow_stdin": False,
                "stop_on_error": False,
            },
        )
        if served["content"].get("status") != "ok":
            c = served["content"]
            why = f"{c.get('ename', 'error')}: {c.get('evalue', '')}"
            raise GpuGroupsError("conflict", f"kernel {self.kernel_id} cannot be the host: {why}")
        self._at("waiting for the bridge comm's hello")
        self._hello = asyncio.get_running_loop().create_future()
        self._send_shell(
            "comm_open",
            {
                "comm_id": self.comm_id,
                "target_name": COMM_TARGET,
                "data": open_data(self._trust_remote_code),
            },
        )
        hello = await self._hello
        if hello.get("protocol") != BRIDGE_PROTOCOL:
            raise GpuGroupsError(
                "conflict",
                f"kernel {self.kernel_id} speaks bridge protocol {hello.get('protocol')!r}, "
                f"this server {BRIDGE_PROTOCOL} (different gpugroups versions?)",
            )
        self.pid = hello.get("pid")
        self._at("attached")

    def _at(self, step: str) -> None:
        self.step = step
        self._log.debug("gpugroups: kernel %s: %s", self.kernel_id, step)

    async def _iopub_ready(self) -> dict[str, Any]:
        """``kernel_info`` over control, repeated until its IOPub idle status shows we are subscribed."""
        loop = asyncio.get_running_loop()
        while True:
            msg = self._client.session.msg("kernel_info_request", {})
            seen = self._iopub_waiters[msg["header"]["msg_id"]] = loop.create_future()
            try:
                reply = await self._control_send(msg, _CONTROL_RETRY)
                await asyncio.wait_for(seen, _IOPUB_PROBE_INTERVAL)
                return reply["content"]
            except TimeoutError:
                continue
            finally:
                self._iopub_waiters.pop(msg["header"]["msg_id"], None)

    async def _create_subshell(self) -> str:
        """``create_subshell_request``, asked again while the kernel is still starting.

        ipykernel answers control messages from early in its start, but until its main thread has
        started (after the user's IPython startup files and extensions ran) a create request fails
        inside the kernel and gets no reply at all, or an error reply. A reply to an earlier try that
        comes in late anyway is cleaned up: its subshell is deleted (see ``_control_send``).
        """
        wait, errors = _CONTROL_RETRY, 0
        while True:
            try:
                reply = await self._control("create_subshell_request", {}, wait)
            except TimeoutError:
                wait = min(2 * wait, 8 * _CONTROL_RETRY)
                continue
            content = reply["content"]
            if content.get("status") == "ok":
                return content["subshell_id"]
            errors += 1
            if errors >= 5:
                raise GpuGroupsError(
                    "conflict",
                    f"kernel {self.kernel_id} could not create a subshell: {content.get('evalue', content)}",
                )
            await asyncio.sleep(wait)

    # ---- requests -------------------------------------------------------------------------
    async def request(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        """Run ``op`` in the host's manager; its errors come back as the same ``GpuGroupsError``."""
        if self.closed:
            raise host_unavailable(f"host kernel {self.kernel_id} is gone")
        rid = uuid.uuid4().hex
        fut = self._pending[rid] = asyncio.get_running_loop().create_future()
        try:
            self._send_shell(
                "comm_msg", {"comm_id": self.comm_id, "data": request_message(rid, op, args)}
            )
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise GpuGroupsError(
                "timeout", f"{op}: no answer from the host kernel within {timeout:g} s (it goes on there)"
            ) from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("ok"):
            return reply.get("result")
        raise GpuGroupsError.from_json(reply.get("error") or {})

    async def close(self, reason: str, tidy: bool = False) -> None:
        """Fail pending requests with ``host_unavailable`` and stop the channels. ``tidy`` (for a
        kernel that lives on as a non-host) first closes the comm and deletes the subshell."""
        if self.closed:
            return
        self.closed = True
        error = host_unavailable(f"host kernel {self.kernel_id}: {reason}")
        waiting = [*self._pending.values(), *self._shell_waiters.values(), *self._iopub_waiters.values()]
        for fut in [*waiting, *([self._hello] if self._hello else [])]:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # whoever awaits it still gets the error; nobody else is told
        if self._client is None:
            return
        if tidy and self.pid is not None:
            with contextlib.suppress(Exception):  # a courtesy: the kernel may go away meanwhile
                await asyncio.wait_for(self._tidy(), _TIDY_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        self._client.stop_channels()

    async def _tidy(self) -> None:
        """Close the comm (its endpoint unsubscribes from the manager), then drop the subshell: after
        the comm_close was handled there, or it would meet a subshell that is gone."""
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        msg = self._send_shell("comm_close", {"comm_id": self.comm_id, "data": {}})
        self._iopub_waiters[msg["header"]["msg_id"]] = closed
        await closed
        if self.subshell_id is not None:
            await self._control("delete_subshell_request", {"subshell_id": self.subshell_id})

    # ---- wire -----------------------------------------------------------------------------
    def _send_shell(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        """Send on shell, addressed to our subshell (if any); returns the message sent."""
        msg = self._client.session.msg(msg_type, content)
        if self.subshell_id is not None:
            msg["header"]["subshell_id"] = self.subshell_id
        self._client.shell_channel.send(msg)
        return msg

    async def _shell_request(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        """Send on shell and wait for the reply (the shell reader hands it over)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        msg = self._send_shell(msg_type, content)
        msg_id = msg["header"]["msg_id"]
        self._shell_waiters[msg_id] = fut
        try:
            return await fut
        finally:
            self._shell_waiters.pop(msg_id, None)

    async def _control(
        self, msg_type: str, content: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        return await self._control_send(self._client.session.msg(msg_type, content), timeout)

    async def _control_send(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send on control and wait for the reply (``TimeoutError`` after ``timeout`` seconds).

        Replies to earlier requests that gave up waiting are skipped, except that the subshell a
        late ``create_subshell_reply`` made is deleted again, so no stray subshell thread is left.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        async with self._control_lock:
            channel = self._client.control_channel
            channel.send(msg)
            while True:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    reply = await channel.get_msg(left)
                except Empty:
                    raise TimeoutError(f"no {msg['header']['msg_type']} reply") from None
                if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    return reply
                late = reply["content"]
                if reply["header"]["msg_type"] == "create_subshell_reply" and late.get("status") == "ok":
                    channel.send(
                        self._client.session.msg(
                            "delete_subshell_request", {"subshell_id": late["subshell_id"]}
                        )
                    )

    async def _read_iopub(self) -> None:
        """Read IOPub: our comm's messages, and the idle status of messages someone waits for; skip
        the rest without unpacking it (a busy notebook's output goes by here too)."""
        session = self._client.session
        socket = self._client.iopub_channel.socket
        try:
            while True:
                frames = await socket.recv_multipart()
                try:
                    _, parts = session.feed_identities(frames)
                    msg = session.deserialize(parts, content=False)
                except ValueError:  # malformed or unsigned: not ours to act on, and no harm done
                    continue
                msg_type = msg["header"]["msg_type"]
                if msg_type == "status":  # someone may wait for the kernel to finish a message
                    waiter = self._iopub_waiters.get(msg["parent_header"].get("msg_id"))
                    if (
                        waiter
                        and not waiter.done()
                        and session.unpack(msg["content"]).get("execution_state") == "idle"
                    ):
                        waiter.set_result(None)
                elif msg_type in ("comm_msg", "comm_close"):
                    content = session.unpack(msg["content"])
                    if content.get("comm_id") != self.comm_id:
                        continue
                    if msg_type == "comm_close":
                        self._broken("the kernel closed the bridge comm")
                    else:
                        self._receive(content.get("data") or {})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken channel means a broken host, never a silent reader death
            self._broken(f"IOPub reader failed: {exc!r}")

    def _receive(self, data: dict[str, Any]) -> None:
        for item in unbatch(data):
            if is_reply(item):
                fut = self._pending.get(item["id"])
                if fut and not fut.done():
                    fut.set_result(item)
            elif item.get("type") == "hello":
                if self._hello and not self._hello.done():
                    self._hello.set_result(item)
            else:
                self._on_data(self, item)

    async def _read_shell(self) -> None:
        """Read shell replies: answers someone awaits, and the error a vanished subshell causes."""
        try:
            while True:
                try:
                    msg = await self._client.shell_channel.get_msg()
                except ValueError:  # malformed or unsigned, as on IOPub
                    continue
                waiter = self._shell_waiters.get(msg["parent_header"].get("msg_id"))
                if waiter and not waiter.done():
                    waiter.set_result(msg)
                elif msg["content"].get("ename") == "UnknownSubshellError":
                    self._broken("the kernel restarted (its subshell is gone)")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._broken(f"shell reader failed: {exc!r}")

    def _broken(self, reason: str) -> None:
        if not self.closed:
            self._on_broken(self, reason)


class Bridge:
    """The server's one way to the host kernel's manager: requests, events, and the host's lifecycle."""

    def __init__(
        self,
        kernel_manager: Any,
        *,
        host_kernel: str = "auto",
        kernel_name: str = "",
        request_timeout: float = 300.0,
        host_start_timeout: float = 120.0,
        kernel_env: dict[str, str] | None = None,
        trust_remote_code: bool = False,
        use_subshells: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        self.km = kernel_manager
        self.host_kernel = host_kernel
        self.kernel_name = kernel_name
        self.request_timeout = request_timeout
        self.host_start_timeout = host_start_timeout
        self.kernel_env = kernel_env or {}
        self.trust_remote_code = trust_remote_code
        self.use_subshells = use_subshells
        self.log = log or logging.getLogger(__name__)
        self.record_path = host_record_path()
        self._conn: HostConnection | None = None
        self._attach_lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self._record_stamp: tuple[int, int] | None = self._stamp()
        self._lost_pids: set[int] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # ---- public ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching the host (idempotent; from the server's loop, at start and on every use)."""
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching and detach (an auto-started host goes down with the server's kernels)."""
        if self._watch_task:
            self._watch_task.cancel()
        if self._conn:
            await self._conn.close("the server is stopping")
            self._conn = None

    async def request(self, op: str, args: Any = None) -> Any:
        """Validate ``args`` for ``op`` here (bad requests never reach a kernel), then run it in the host."""
        kwargs = get_op(op).validate(args)
        conn = await self._host()
        return await conn.request(op, kwargs, self.request_timeout)

    def host_info(self) -> dict[str, Any]:
        """``{kernel_id, subshells, started_by}``; all None when no host is attached."""
        self.start()
        if self._conn is None:
            return {"kernel_id": None, "subshells": None, "started_by": None}
        return self._conn.info()

    async def set_host(self, kernel_id: str) -> dict[str, Any]:
        """Make a running kernel of this server the host (it runs ``gg.serve()``)."""
        self.start()
        if kernel_id not in self.km:
            raise GpuGroupsError("unknown_kernel", f"no running kernel {kernel_id!r} on this server")
        async with self._attach_lock:
            if self._conn is None or self._conn.kernel_id != kernel_id:
                await self._attach(kernel_id, "api")
        return self.host_info()

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(message)`` for every event (state updates, progress, host changes)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # ---- choosing the host ----------------------------------------------------------------
    async def _host(self) -> HostConnection:
        self.start()
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._attach_lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            kernel_id = await self._recorded_host()
            if kernel_id is not None:
                return await self._attach(kernel_id, "serve")
            if self.host_kernel != "auto":
                raise host_unavailable(
                    "no host kernel: run `import gpugroups as gg; gg.serve()` in a notebook, "
                    "or POST /api/v2/system/host {kernel_id}"
                )
            kwargs = {"kernel_name": self.kernel_name} if self.kernel_name else {}
            kernel_id = await self.km.start_kernel(path="", env={**os.environ, **self.kernel_env}, **kwargs)
            self.log.info("gpugroups: started host kernel %s", kernel_id)
            try:
                return await self._attach(kernel_id, "server")
            except GpuGroupsError as exc:  # e.g. a broken ./gpugroups.toml: no host, whatever the cause
                raise host_unavailable(
                    f"the host kernel the server started could not serve: {exc.message}"
                ) from None

    async def _attach(self, kernel_id: str, started_by: str) -> HostConnection:
        """Under the attach lock: connect ``kernel_id``; on success it replaces the current host."""
        conn = HostConnection(
            self.km,
            kernel_id,
            started_by,
            self._on_data,
            self._on_broken,
            trust_remote_code=self.trust_remote_code,
            use_subshells=self.use_subshells,
            log=self.log,
        )
        try:
            await conn.attach(self.host_start_timeout)
        except BaseException:
            if started_by == "server":
                self._shut_down(kernel_id)
            raise
        old, self._conn = self._conn, conn
        if old is not None:
            await self._drop(old, f"kernel {kernel_id} is the host now", tidy=True)
        self.log.info(
            "gpugroups: host kernel is %s (%s, subshells: %s)", kernel_id, started_by, conn.subshells
        )
        self._spawn(self._announce(conn))
        return conn

    async def _recorded_host(self) -> str | None:
        """The live kernel of this server that wrote the host record, if that process still runs it
        and was not lost as a host already (a record outlives its kernel)."""
        record = read_host_record(self.record_path)
        if not record or record.get("pid") in self._lost_pids:
            return None
        target = os.path.realpath(str(record.get("connection_file", "")))
        for kernel_id in self.km.list_kernel_ids():
            kernel = self.km.get_kernel(kernel_id)
            if os.path.realpath(kernel.connection_file) != target:
                continue
            pid = _kernel_pid(kernel)
            if (pid is None or pid == record.get("pid")) and await kernel.is_alive():
                return kernel_id
        return None

    async def _announce(self, conn: HostConnection) -> None:
        """Tell every listener the new host's whole state."""
        try:
            state = await conn.request("state", {}, self.request_timeout)
        except GpuGroupsError:
            return  # the host died already; its loss was announced
        self._emit({"type": "system_state", "version": state["version"], "state": state, "host": conn.info()})

    # ---- watching -------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self._check_host()
                self._check_record()
            except Exception:  # the watchdog must outlive any one bad look
                self.log.exception("gpugroups: host watchdog")

    async def _check_host(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        if conn.kernel_id not in self.km:
            reason = "the kernel was shut down"
        elif not await self.km.get_kernel(conn.kernel_id).is_alive():
            reason = "the kernel died"
        elif conn.pid is not None and _kernel_pid(conn.kernel) not in (None, conn.pid):
            reason = "the kernel restarted"
        else:
            return
        await self._lose(conn, reason)

    def _check_record(self) -> None:
        """A new host record: attach its kernel in the background. An attach can take long (the
        kernel's first ``serve()`` imports torch; on the main shell it waits for running cells),
        and the watchdog must keep watching the current host meanwhile."""
        stamp = self._stamp()
        if stamp == self._record_stamp:
            return
        self._record_stamp = stamp
        self._spawn(self._follow_record())

    async def _follow_record(self) -> None:
        try:
            kernel_id = await self._recorded_host()
            if kernel_id is None or (self._conn is not None and self._conn.kernel_id == kernel_id):
                return
            async with self._attach_lock:
                if self._conn is not None and self._conn.kernel_id == kernel_id:
                    return  # attached meanwhile, for a request
                await self._attach(kernel_id, "serve")
        except GpuGroupsError as exc:
            self.log.warning("gpugroups: a kernel ran gg.serve() but could not be attached: %s", exc)
        except Exception:  # nobody awaits this task: say what went wrong
            self.log.exception("gpugroups: following the host record")

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.record_path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    # ---- losing the host ------------------------------------------------------------------
    def _on_broken(self, conn: HostConnection, reason: str) -> None:
        self._spawn(self._lose(conn, reason))

    async def _lose(self, conn: HostConnection, reason: str) -> None:
        if conn.closed:
            return
        was_host = self._conn is conn
        if was_host:
            self._conn = None
        if conn.pid is not None:
            self._lost_pids.add(conn.pid)
        self.log.warning("gpugroups: lost host kernel %s: %s", conn.kernel_id, reason)
        await self._drop(conn, reason)
        if was_host:  # a kernel that fails while attaching tells its own caller instead
            self._emit(
                {
                    "type": "error",
                    "error": host_unavailable(f"host kernel {conn.kernel_id}: {reason}").to_json(),
                }
            )

    async def _drop(self, conn: HostConnection, reason: str, tidy: bool = False) -> None:
        """Detach ``conn``; a kernel this server started for the purpose is shut down with it."""
        if conn.started_by == "server":
            await conn.close(reason)
            self._shut_down(conn.kernel_id)
        else:
            await conn.close(reason, tidy=tidy)

    def _shut_down(self, kernel_id: str) -> None:
        """Shut down a kernel this server started as the host, in the background (it may be gone)."""

        async def shut_down() -> None:
            if kernel_id in self.km:
                try:
                    await self.km.shutdown_kernel(kernel_id, now=True)
                except Exception as exc:  # raced with another shutdown or a restart: nothing left to do
                    self.log.debug("gpugroups: shutting down kernel %s: %r", kernel_id, exc)

        self._spawn(shut_down())

    # ---- fan-out --------------------------------------------------------------------------
    def _on_data(self, conn: HostConnection, event: dict[str, Any]) -> None:
        if conn is self._conn:
            self._emit(event)

    def _emit(self, message: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:  # one broken socket must not starve the others
                self.log.exception("gpugroups: event listener failed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
