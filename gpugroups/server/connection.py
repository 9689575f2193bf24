"""The server's connection to one kernel's manager: its channels, a subshell, the ``gpugroups.v2``
comm, and requests matched to their replies. Which kernel that is, is the host policy's business.

A ``KernelConnection`` is a kernel client from the server's own kernel manager (with a socket
identity of its own), a subshell created on control, and the comm opened on that subshell after
the kernel ran ``ensure_served()``. Requests ``{id, op, args}`` go out on the comm's direct line
(``directline``) when the kernel's end answers its ping, else on the subshell; replies
``{id, ok, result | error}`` come back the same way. Pushed events come on IOPub and go to
``on_data``.
A broken channel, a closed comm, a vanished subshell or the kernel's announced shutdown goes to
``on_broken`` (so requests in flight fail as ``host_unavailable`` before the kernel stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping
from queue import Empty
from typing import Any

from .._ipykernel import (
    SUBSHELL_CREATE_ERRORS,
    SUBSHELL_CREATE_RETRY,
    UNKNOWN_SUBSHELL_ERROR,
    client_with_own_identity,
)
from ..directline import ServerLine, answering_line
from ..errors import GpuGroupsError
from ..protocol import (
    BRIDGE_PROTOCOL,
    COMM_TARGET,
    cancel_message,
    get_op,
    is_reply,
    open_data,
    request_message,
    unbatch,
)

#: Run in a kernel to make it the host; idempotent, and it leaves no names in the user's namespace.
SERVE_CODE = "__import__('gpugroups.kernel').kernel.ensure_served()"
#: Seconds between two looks at a kernel's process (while attaching, and the host's watchdog).
WATCH_INTERVAL = 0.25
#: IOPub subscriptions have no welcome message: re-ask ``kernel_info`` this often until it shows.
_IOPUB_PROBE_INTERVAL = 0.5
#: Seconds to wait for a control reply before asking again.
_CONTROL_RETRY = 0.5
#: Seconds a kernel that stops being the host gets to close the bridge's comm and subshell.
_TIDY_TIMEOUT = 2.0


def host_unavailable(message: str) -> GpuGroupsError:
    """The error of a request that no live host kernel can answer (503)."""
    return GpuGroupsError("host_unavailable", message)


def kernel_pid(kernel: Any) -> int | None:
    """A kernel's process id as the server's kernel manager knows it (None if it cannot tell)."""
    return getattr(getattr(kernel, "provisioner", None), "pid", None)


class KernelConnection:
    """One attached kernel: its channels, subshell and comm, pending requests and readers."""

    def __init__(
        self,
        kernel_manager: Any,
        kernel_id: str,
        on_data: Callable[[KernelConnection, dict[str, Any]], None],
        on_broken: Callable[[KernelConnection, str], None],
        *,
        started_by: str = "",
        trust_remote_code: bool = False,
        use_subshells: bool = True,
        direct_line: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        #: Who asked for this connection ("serve", "api", "server"): the host policy's label.
        self.started_by = started_by
        self.kernel = kernel_manager.get_kernel(kernel_id)
        self.subshell_id: str | None = None
        self.comm_id = uuid.uuid4().hex
        self.pid: int | None = None
        self.closed = False
        #: Set when the kernel announced a restart (its ``shutdown_reply`` on IOPub).
        self.restarting = False
        self._on_data = on_data
        self._on_broken = on_broken
        self._trust_remote_code = trust_remote_code
        self._use_subshells = use_subshells
        self._direct_line = direct_line
        #: The direct line to the kernel, when it answered (else requests take the comm).
        self.line: ServerLine | None = None
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

    # ---- attaching ------------------------------------------------------------------------
    async def attach(self, timeout: float) -> None:
        """Connect, open a subshell, make the kernel serve, open the comm; ``host_unavailable`` on
        failure, at once if the kernel dies or restarts meanwhile. Only ``timeout`` bounds a live
        kernel: its first ``serve()`` loads torch, which can take a while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        process = kernel_pid(self.kernel)
        steps = asyncio.ensure_future(self._attach())
        try:
            while True:
                done, _ = await asyncio.wait({steps}, timeout=WATCH_INTERVAL)
                if done:
                    if self.closed:  # broken meanwhile (it announced a restart) and closed by its owner
                        raise host_unavailable(
                            f"kernel {self.kernel_id} stopped before it became the host ({self.step})"
                        )
                    return steps.result()
                if not await self.kernel.is_alive():
                    raise host_unavailable(
                        f"kernel {self.kernel_id} died before it became the host ({self.step})"
                    )
                if kernel_pid(self.kernel) != process:  # what we sent went to the process before
                    raise host_unavailable(
                        f"kernel {self.kernel_id} restarted before it became the host ({self.step})"
                    )
                if loop.time() > deadline:
                    raise host_unavailable(
                        f"kernel {self.kernel_id} did not become the host within {timeout:g} s "
                        f"(stuck {self.step})"
                    )
        except BaseException as exc:
            steps.cancel()
            # a kernel that answered but cannot serve lives on as the user's: take our subshell back
            await self.close("attach failed", tidy=isinstance(exc, GpuGroupsError) and exc.code == "conflict")
            raise

    async def _attach(self) -> None:
        self._client = client_with_own_identity(self.kernel)
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
                "data": open_data(self._trust_remote_code, self._direct_line),
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
        if hello.get("line"):
            self._at("pinging the direct line")
            self.line = await answering_line(self._client.session, hello["line"], self._receive)
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
                info: dict[str, Any] = reply["content"]
                return info
            except TimeoutError:
                continue
            finally:
                self._iopub_waiters.pop(msg["header"]["msg_id"], None)

    async def _create_subshell(self) -> str:
        """``create_subshell_request``, asked again while the kernel is still starting (ipykernel's
        early-subshell gap, ``_ipykernel`` workaround 6). A reply to an earlier try that comes in
        late anyway is cleaned up: its subshell is deleted (see ``_control_send``)."""
        wait, errors = SUBSHELL_CREATE_RETRY, 0
        while True:
            try:
                reply = await self._control("create_subshell_request", {}, wait)
            except TimeoutError:
                wait = min(2 * wait, 8 * SUBSHELL_CREATE_RETRY)
                continue
            content = reply["content"]
            if content.get("status") == "ok":
                return str(content["subshell_id"])
            errors += 1
            if errors >= SUBSHELL_CREATE_ERRORS:
                raise GpuGroupsError(
                    "conflict",
                    f"kernel {self.kernel_id} could not create a subshell: {content.get('evalue', content)}",
                )
            await asyncio.sleep(wait)

    # ---- requests -------------------------------------------------------------------------
    async def request(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        """Run ``op`` in the host's manager; its errors come back as the same ``GpuGroupsError``.

        A cancellable op (``Op.cancellable``) whose caller stops waiting (``timeout``, or this
        coroutine cancelled because the HTTP client went away) is cancelled in the host too."""
        if self.closed:
            raise host_unavailable(f"host kernel {self.kernel_id} is gone")
        rid = uuid.uuid4().hex
        fut = self._pending[rid] = asyncio.get_running_loop().create_future()
        try:
            self._send(request_message(rid, op, args))
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._cancel(op, rid)
            raise GpuGroupsError(
                "timeout", f"{op}: no answer from the host kernel within {timeout:g} s"
                + (" (cancelled there)" if get_op(op).cancellable else " (it goes on there)"),
            ) from None
        except asyncio.CancelledError:
            self._cancel(op, rid)
            raise
        finally:
            self._pending.pop(rid, None)
        if reply.get("ok"):
            return reply.get("result")
        raise GpuGroupsError.from_json(reply.get("error") or {})

    def _cancel(self, op: str, rid: str) -> None:
        """Tell the host that nobody waits for request ``rid`` any more (if its op can be cancelled)."""
        if get_op(op).cancellable and not self.closed:
            self._send(cancel_message(rid))

    def _send(self, data: Mapping[str, Any]) -> None:
        """A request or cancel to the host: on the direct line if there is one, else on the comm."""
        if self.line is not None:
            self.line.send(data)
        else:
            self._send_shell("comm_msg", {"comm_id": self.comm_id, "data": data})

    async def close(self, reason: str, tidy: bool = False) -> None:
        """Fail pending requests with ``host_unavailable``, stop the channels. ``tidy`` (a kernel that
        lives on as a non-host): first cancel them there, close the comm, delete the subshell."""
        if self.closed:
            return
        self.closed = True
        for rid in self._pending if tidy else ():
            with contextlib.suppress(Exception):  # the kernel may be going away meanwhile
                self._send(cancel_message(rid))
        error = host_unavailable(f"host kernel {self.kernel_id}: {reason}")
        waiting: list[asyncio.Future[Any]] = [
            *self._pending.values(),
            *self._shell_waiters.values(),
            *self._iopub_waiters.values(),
            *([self._hello] if self._hello else []),
        ]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # whoever awaits it still gets the error; nobody else is told
        if self.line is not None:
            self.line.close()
        if self._client is None:
            return
        if tidy:
            with contextlib.suppress(Exception):  # a courtesy: the kernel may go away meanwhile
                await asyncio.wait_for(self._tidy(), _TIDY_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        self._client.stop_channels()

    async def _tidy(self) -> None:
        """Close the comm (its endpoint unsubscribes from the manager), then drop the subshell: after
        the comm_close was handled there, or it would meet a subshell that is gone."""
        if self.pid is not None:  # the hello came: the comm is open
            closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            msg = self._send_shell("comm_close", {"comm_id": self.comm_id, "data": {}})
            self._iopub_waiters[msg["header"]["msg_id"]] = closed
            await closed
        if self.subshell_id is not None:
            await self._control("delete_subshell_request", {"subshell_id": self.subshell_id})

    # ---- wire -----------------------------------------------------------------------------
    def _send_shell(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        """Send on shell, addressed to our subshell (if any); returns the message sent."""
        msg: dict[str, Any] = self._client.session.msg(msg_type, content)
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
                    answer: dict[str, Any] = reply
                    return answer
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
                elif msg_type == "shutdown_reply":  # broadcast before the kernel stops: fail fast
                    self.restarting = session.unpack(msg["content"]).get("restart") is True
                    self._broken(
                        "the kernel is restarting" if self.restarting else "the kernel is shutting down"
                    )
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
                elif msg["content"].get("ename") == UNKNOWN_SUBSHELL_ERROR:
                    self._broken("the kernel restarted (its subshell is gone)")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._broken(f"shell reader failed: {exc!r}")

    def _broken(self, reason: str) -> None:
        if not self.closed:
            self._on_broken(self, reason)
