"""The host policy: which kernel is the host, and what the server does about it. Owns the
extension's settings for it, attaches the host (``connection.KernelConnection``), fans its events
out to listeners and notices when it dies.

The host is the kernel a notebook named with ``gg.serve()`` (its host record), one chosen by
``POST /system/host``, or one started here on first use (``host_kernel = "auto"``). A watchdog
looks at the host's process and at the host record a few times a second, so requests fail with
``host_unavailable`` right after the host dies instead of hanging, and a new ``gg.serve()`` is
followed within a second. A host that restarts (Jupyter's restart) stays the host: requests in
flight answer ``host_unavailable`` and its new process is attached again, not replaced.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from traitlets import Any as AnyTrait
from traitlets import Bool, CaselessStrEnum, Float, Int, List, Unicode
from traitlets.config import LoggingConfigurable

from ..errors import GpuGroupsError
from ..hostrecord import host_record_path, read_host_record
from ..kernelenv import DEVICES_ENV, RAY_ADDRESS_ENV, RAY_NAMESPACE_ENV, kernel_env
from ..localfiles import ROOTS_ENV
from ..protocol import get_op
from .connection import WATCH_INTERVAL, KernelConnection, host_unavailable, kernel_pid
from .mirror import READS, StateMirror

Listener = Callable[[dict[str, Any]], None]
#: The watchdog's reason for a host whose process changed under the same kernel id.
RESTARTED = "the kernel restarted"


class GpuGroupsHost(LoggingConfigurable):
    """The server's one way to the host kernel's manager: requests, events, and the host's lifecycle.

    Configured as ``c.GpuGroupsHost.<setting>``; built by the extension with ``parent=`` the app.
    """

    host_kernel = CaselessStrEnum(
        ["auto", "none"],
        default_value="auto",
        help="""With no host kernel (no notebook ran gg.serve()): "auto" starts one on first use
        (it shows among the running kernels, so a console can attach); "none" answers 503
        host_unavailable until a notebook runs gg.serve() or POST /api/v2/system/host names one.""",
    ).tag(config=True)

    kernel_name = Unicode(
        "", help="Kernel spec of the auto-started host kernel (default: the server's default kernel)."
    ).tag(config=True)

    request_timeout = Float(
        300.0, help="Seconds a REST request waits for the host kernel's answer before 504 timeout."
    ).tag(config=True)

    host_start_timeout = Float(
        120.0, help="Seconds to wait for a kernel to become the host (its first gg.serve() imports torch)."
    ).tag(config=True)

    model_roots = List(
        Unicode(),
        help=f"""Extra folders under which local model paths may be loaded by id, passed to the
        auto-started host kernel as ${ROOTS_ENV}. Paths outside the allowed roots are unknown_model.""",
    ).tag(config=True)

    devices = List(
        Unicode(),
        help=f"""Device specs of the auto-started host kernel's manager (e.g. ["ray"],
        ["ray:virtual:8GiB"], ["cuda:0", "cuda:1"]), passed to it as ${DEVICES_ENV}. Empty: the
        manager's default ("auto": every CUDA device, else the cpu).""",
    ).tag(config=True)

    ray_address = Unicode(
        "",
        help=f"""The Ray cluster the auto-started host kernel joins for Ray devices, passed as
        ${RAY_ADDRESS_ENV}. Empty: the server's own ${RAY_ADDRESS_ENV} if set, else ray.init(address="auto").""",
    ).tag(config=True)

    ray_namespace = Unicode(
        "",
        help=f"""Ray namespace of the auto-started host kernel's device actors, passed as
        ${RAY_NAMESPACE_ENV}; a restarted host adopts the groups its actors hold. Empty: "gpugroups".""",
    ).tag(config=True)

    trust_remote_code = Bool(
        False,
        help="""Let REST clients load groups marked trust_remote_code (they run code from the model
        folder). Off: such loads are refused over the API; a notebook can still load them.""",
    ).tag(config=True)

    use_subshells = Bool(
        True,
        help="""Open the bridge comm on a kernel subshell (ipykernel >= 7) so the API answers while a
        cell runs in the host kernel. False (or an older kernel) uses the main shell: attaching
        waits for running cells, and so do requests unless they take the direct line.""",
    ).tag(config=True)

    direct_line = Bool(
        True,
        help="""Send requests and replies on a socket of their own between this server and the host
        kernel (bound like the kernel's channels, signed with its key), about 2 ms shorter than
        the two trips through the kernel's shell and IOPub channels. Events still come on IOPub.
        False, or a kernel whose line does not answer, uses the comm for everything.""",
    ).tag(config=True)

    max_body_bytes = Int(
        2 * 1024 * 1024,
        help="""Largest request body accepted (bytes); a larger one is refused with invalid_request
        here, before anything reaches the host kernel. The default fits the longest prompt.""",
    ).tag(config=True)

    ws_send_timeout = Float(
        30.0,
        help="""Seconds a WebSocket client may take to accept one message. While it has not, newer
        events wait coalesced (latest state wins, so a client that does not read costs the server
        one pending state, not one per change); past this the server closes the socket.""",
    ).tag(config=True)

    kernel_manager = AnyTrait(help="The Jupyter server's kernel manager: host kernels are its kernels.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record_path = host_record_path()
        self._conn: KernelConnection | None = None
        self._attach_lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self._record_stamp: tuple[int, int] | None = self._stamp()
        self._lost_pids: set[int] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._mirror = StateMirror()
        self._reattaching: asyncio.Future[None] | None = None
        self._finding: asyncio.Task[KernelConnection] | None = None  # finding or starting the host

    # ---- what the handlers use ------------------------------------------------------------
    def start(self) -> None:
        """Start watching the host (idempotent; from the server's loop, at start and on every use)."""
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching and detach (an auto-started host goes down with the server's kernels)."""
        for task in (self._watch_task, self._finding):
            if task is not None:
                task.cancel()
        if self._conn:
            await self._conn.close("the server is stopping")
            self._conn = None

    async def request(self, op: str, args: Any = None) -> Any:
        """Validate ``args`` for ``op`` here (bad requests never reach a kernel), then run it in the host."""
        kwargs = get_op(op).validate(args)
        mirrored = self._mirror.answer(op)
        if mirrored is not None:
            return mirrored
        conn = await self._host()
        if op in READS:
            ticket = self._mirror.ticket()
            answer = await conn.request("state", {}, self.request_timeout)
            if conn is self._conn:
                self._mirror.read(answer, ticket)
            part = READS[op]
            return answer if part is None else answer[part]
        self._mirror.started()
        try:
            return await conn.request(op, kwargs, self.request_timeout)
        finally:
            self._mirror.finished()

    def host_info(self) -> dict[str, Any]:
        """``{kernel_id, subshells, started_by}``; all None when no host is attached."""
        self.start()
        return _info(self._conn)

    async def set_host(self, kernel_id: str) -> dict[str, Any]:
        """Make a running kernel of this server the host (it runs ``gg.serve()``)."""
        self.start()
        if kernel_id not in self.kernel_manager:
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
    async def _host(self) -> KernelConnection:
        self.start()
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._reattaching is not None and not self._reattaching.done():
            await asyncio.shield(self._reattaching)  # the restarted host, rather than a new one
        if self._finding is None or self._finding.done():
            self._finding = asyncio.create_task(self._find_host())
            self._finding.add_done_callback(_seen)
        # Shielded: a caller that goes away (a REST client's disconnect cancels its wait) must not
        # stop a host start that the next caller needs (its kernel would be shut down half-started).
        return await asyncio.shield(self._finding)

    async def _find_host(self) -> KernelConnection:
        """The host kernel: the current one, the recorded one, or (``host_kernel="auto"``) a new one."""
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
            kernel_id = await self.kernel_manager.start_kernel(path="", env=self._kernel_env(), **kwargs)
            self.log.info("gpugroups: started host kernel %s", kernel_id)
            try:
                return await self._attach(kernel_id, "server")
            except GpuGroupsError as exc:  # e.g. a broken ./gpugroups.toml: no host, whatever the cause
                raise host_unavailable(
                    f"the host kernel the server started could not serve: {exc.message}"
                ) from None

    async def _attach(self, kernel_id: str, started_by: str) -> KernelConnection:
        """Under the attach lock: connect ``kernel_id``; on success it replaces the current host."""
        conn = KernelConnection(
            self.kernel_manager,
            kernel_id,
            self._on_data,
            self._on_broken,
            started_by=started_by,
            trust_remote_code=self.trust_remote_code,
            use_subshells=self.use_subshells,
            direct_line=self.direct_line,
            log=self.log,
        )
        try:
            await conn.attach(self.host_start_timeout)
        except BaseException:
            if started_by == "server":
                self._shut_down(kernel_id)
            raise
        old, self._conn = self._conn, conn
        self._mirror.clear()
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
        for kernel_id in self.kernel_manager.list_kernel_ids():
            kernel = self.kernel_manager.get_kernel(kernel_id)
            if os.path.realpath(kernel.connection_file) != target:
                continue
            pid = kernel_pid(kernel)
            if (pid is None or pid == record.get("pid")) and await kernel.is_alive():
                return str(kernel_id)
        return None

    async def _announce(self, conn: KernelConnection) -> None:
        """Tell every listener the new host's whole state."""
        try:
            state = await conn.request("state", {}, self.request_timeout)
        except GpuGroupsError:
            return  # the host died already; its loss was announced
        self._emit({"type": "system_state", "version": state["version"], "state": state, "host": _info(conn)})

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
        if conn.kernel_id not in self.kernel_manager:
            reason = "the kernel was shut down"
        elif not await self.kernel_manager.get_kernel(conn.kernel_id).is_alive():
            reason = "the kernel died"
        elif conn.pid is not None and kernel_pid(conn.kernel) not in (None, conn.pid):
            reason = RESTARTED
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
    def _on_broken(self, conn: KernelConnection, reason: str) -> None:
        self._spawn(self._lose(conn, reason))

    async def _lose(self, conn: KernelConnection, reason: str) -> None:
        if conn.closed:
            return
        was_host = self._conn is conn
        if was_host:
            self._conn = None
            self._mirror.clear()
        if conn.pid is not None:
            self._lost_pids.add(conn.pid)
        self.log.warning("gpugroups: lost host kernel %s: %s", conn.kernel_id, reason)
        restarted = conn.restarting or reason == RESTARTED
        await self._drop(conn, reason, keep_kernel=restarted)
        if was_host and restarted:
            self._reattaching = asyncio.ensure_future(self._reattach(conn))
        if was_host:  # a kernel that fails while attaching tells its own caller instead
            self._emit(
                {
                    "type": "error",
                    "error": host_unavailable(f"host kernel {conn.kernel_id}: {reason}").to_json(),
                }
            )

    async def _reattach(self, lost: KernelConnection) -> None:
        """A host that restarted stays the host: attach its new process (with the same label) once
        it runs, unless another host was attached meanwhile; one that does not come back within
        ``host_start_timeout`` is treated as dead."""
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.host_start_timeout
            while lost.kernel_id in self.kernel_manager and loop.time() < deadline:
                kernel = self.kernel_manager.get_kernel(lost.kernel_id)
                if kernel_pid(kernel) not in (None, lost.pid) and await kernel.is_alive():
                    async with self._attach_lock:
                        if self._conn is None:
                            await self._attach(lost.kernel_id, lost.started_by)
                    return
                await asyncio.sleep(WATCH_INTERVAL)
            if lost.started_by == "server":
                self._shut_down(lost.kernel_id)
        except GpuGroupsError as exc:
            self.log.warning(
                "gpugroups: the restarted host %s could not be attached: %s", lost.kernel_id, exc
            )
        except Exception:  # nobody else is told: say what went wrong
            self.log.exception("gpugroups: re-attaching the restarted host %s", lost.kernel_id)

    async def _drop(
        self, conn: KernelConnection, reason: str, tidy: bool = False, keep_kernel: bool = False
    ) -> None:
        """Detach ``conn``; a kernel this server started for the purpose is shut down with it
        (unless ``keep_kernel``: it restarted and is attached again)."""
        if conn.started_by == "server" and not keep_kernel:
            await conn.close(reason)
            self._shut_down(conn.kernel_id)
        else:
            await conn.close(reason, tidy=tidy)

    def _shut_down(self, kernel_id: str) -> None:
        """Shut down a kernel this server started as the host, in the background (it may be gone)."""

        async def shut_down() -> None:
            if kernel_id in self.kernel_manager:
                try:
                    await self.kernel_manager.shutdown_kernel(kernel_id, now=True)
                except Exception as exc:  # raced with another shutdown or a restart: nothing left to do
                    self.log.debug("gpugroups: shutting down kernel %s: %r", kernel_id, exc)

        self._spawn(shut_down())

    # ---- fan-out --------------------------------------------------------------------------
    def _on_data(self, conn: KernelConnection, event: dict[str, Any]) -> None:
        if conn is self._conn:
            self._emit(event)

    def _emit(self, message: dict[str, Any]) -> None:
        self._mirror.heard(message)
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:  # one broken socket must not starve the others
                self.log.exception("gpugroups: event listener failed")

    def _kernel_env(self) -> dict[str, str]:
        """The auto-started host's environment: the server's, plus these settings (``kernelenv``)."""
        return {**os.environ, **kernel_env(self.devices, self.ray_address, self.ray_namespace, self.model_roots)}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _seen(task: asyncio.Task[Any]) -> None:
    """Mark a shared task's failure as seen: each caller that waited for it got it; with none left,
    asyncio would log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _info(conn: KernelConnection | None) -> dict[str, Any]:
    """``{kernel_id, subshells, started_by}`` as ``GET /system/host`` shows it; all None without a host."""
    if conn is None:
        return {"kernel_id": None, "subshells": None, "started_by": None}
    return {"kernel_id": conn.kernel_id, "subshells": conn.subshells, "started_by": conn.started_by}
