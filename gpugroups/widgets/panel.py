"""The panel's kernel side: mirror a Manager's state into a synced trait, run the front end's actions.

The front end (``panel.js``) reads the ``state`` trait (the state JSON of ``Manager.state()``)
and ``progress`` (the latest ``load_progress`` per running operation), and acts by custom
messages ``{"action": OP, "request_id": ..., **args}`` where OP is an op of the ops table.
Actions run on a small thread pool, so a load never blocks the kernel's comm handling; manager
events arrive on the manager's threads and are coalesced before they reach the comm.

The front end's messages are handled where they were sent to. JupyterLab 4.4 and newer (and
Notebook 7) send widget messages on a kernel subshell. ipykernel 7, though, routes a comm's
incoming messages to wherever that comm last sent from, and the panel sends from pool and relay
threads, which count as the main shell. So every click would wait for a running cell. The
panel's comm therefore routes each incoming message by its own header.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from .. import protocol
from ..errors import GpuGroupsError

if TYPE_CHECKING:
    from ..core import Manager

_HERE = Path(__file__).resolve().parent

#: How long the relay waits after the first event of a burst before it publishes, so that a
#: load's handful of events reach the browser as one update (well inside the 200 ms goal).
COALESCE_S = 0.015
#: Actions that may run at once: a slow load on one device must not hold a prompt on another.
ACTION_WORKERS = 4


class Panel(anywidget.AnyWidget):
    """Live view and controls for a ``Manager``: devices, catalog, prompt box.

    ``state`` follows every manager event; ``close()`` detaches from the manager.
    """

    _esm = _HERE / "panel.js"
    _css = _HERE / "panel.css"

    state = traitlets.Dict().tag(sync=True)
    progress = traitlets.Dict().tag(sync=True)

    def __init__(self, manager: Manager, **kwargs: Any) -> None:
        super().__init__(state=manager.state(), **kwargs)
        self._manager = manager
        self._pool = ThreadPoolExecutor(ACTION_WORKERS, thread_name_prefix="gpugroups-panel")
        if self.comm is not None:  # route the front end's messages by their own subshell id
            self.comm._reply_subshell_for = _route_by_header
        self._relay = _Relay(self._publish)
        self.on_msg(self._on_custom_msg)
        # Take a second snapshot after subscribing: an event between the first snapshot and
        # the subscription is then covered, and duplicates are dropped by version.
        self._unsubscribe: Callable[[], None] | None = manager.subscribe(self._relay.offer)
        self._relay.offer_snapshot(manager.state())
        self._relay.flush()

    @property
    def manager(self) -> Manager:
        """The manager this panel shows and drives."""
        return self._manager

    def close(self) -> None:
        """Detach from the manager, stop the relay and the action pool, close the comm."""
        unsubscribe, self._unsubscribe = getattr(self, "_unsubscribe", None), None
        if unsubscribe is not None:
            unsubscribe()
            self._relay.stop()
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()

    # ---- front end -> manager ------------------------------------------------------------
    def _on_custom_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        """Queue one action; never raises, so no traceback ever lands in the cell."""
        if not isinstance(content, dict):
            self.send(
                _reply(None, None, GpuGroupsError("invalid_request", "a panel message must be a JSON object"))
            )
            return
        args = dict(content)
        action = args.pop("action", None)
        request_id = args.pop("request_id", None)
        try:
            self._pool.submit(self._run, action, request_id, args)
        except RuntimeError:  # closed meanwhile: nobody is listening for the reply
            pass

    def _run(self, action: Any, request_id: Any, args: dict[str, Any]) -> None:
        try:
            result: Any = protocol.dispatch(self._manager, action, args)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an inline error in the panel
            result = exc
        # Events reach the relay from the manager's dispatcher thread, possibly after this
        # return; publish a snapshot first so the reply never overtakes the state it produced.
        self._relay.offer_snapshot(self._manager.state())
        self._relay.flush()
        self.send(_reply(action, request_id, result))

    # ---- manager -> front end ------------------------------------------------------------
    def _publish(self, state: dict[str, Any] | None, progress: dict[str, Any]) -> None:
        with self.hold_sync():
            if state is not None:
                self.state = state
            if progress != self.progress:
                self.progress = progress


def _route_by_header(_data: Any, header_subshell_id: str | None) -> str | None:
    """ipykernel's routing hook for a comm's incoming message: where it was sent to."""
    return header_subshell_id


def _reply(action: Any, request_id: Any, result: Any) -> dict[str, Any]:
    """The answer to one action, in the panel contract's shape."""
    reply: dict[str, Any] = {"reply_to": action, "request_id": request_id}
    if isinstance(result, BaseException):
        reply.update(ok=False, error=protocol.error_json(result))
    else:
        reply.update(ok=True, result=result)
    return reply


class _Relay:
    """Coalesce manager events (from any thread) into few, ordered trait updates.

    Keeps the newest state by version (a snapshot an action took may be newer than an event
    still on its way) and the newest progress per operation; a daemon thread publishes them ``COALESCE_S``
    after the first event of a burst. Progress of operations that the newest state no longer
    lists is dropped, so finished loads leave no bars behind.
    """

    def __init__(self, publish: Callable[[dict[str, Any] | None, dict[str, Any]], None]) -> None:
        self._publish = publish
        self._cond = threading.Condition()
        self._publishing = threading.Lock()  # keeps flushes from two threads in order
        self._pending_state: dict[str, Any] | None = None
        self._state: dict[str, Any] = {}
        self._version = -1
        self._progress: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="gpugroups-panel-relay", daemon=True)
        self._thread.start()

    def offer(self, event: dict[str, Any]) -> None:
        """Take one manager event (``state_update`` or ``load_progress``); others are ignored."""
        kind = event.get("type")
        with self._cond:
            if kind == "state_update" and event.get("version", -1) > self._version:
                self._version = event["version"]
                self._pending_state = event["state"]
            elif kind == "load_progress" and event.get("operation_id") is not None:
                self._progress[str(event["operation_id"])] = {
                    k: event.get(k) for k in ("group_id", "device_id", "progress", "stage", "version")
                }
            else:
                return
            self._dirty = True
            self._cond.notify()

    def offer_snapshot(self, state: dict[str, Any]) -> None:
        """Take a ``Manager.state()`` read now; it wins over an event of the same version."""
        with self._cond:
            if state.get("version", 0) >= self._version:
                self._version = state.get("version", 0)
                self._pending_state = state
                self._dirty = True
                self._cond.notify()

    def flush(self) -> None:
        """Publish whatever is pending now, on the calling thread."""
        with self._publishing:
            with self._cond:
                if not self._dirty:
                    return
                state, self._pending_state = self._pending_state, None
                if state is not None:
                    self._state = state
                live = {str(op.get("id")) for op in self._state.get("operations", [])}
                self._progress = {
                    k: p
                    for k, p in self._progress.items()
                    if k in live or (p.get("version") or 0) > self._version
                }
                progress = dict(self._progress)
                self._dirty = False
            self._publish(state, progress)

    def stop(self) -> None:
        """End the relay thread; pending events are dropped."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=1)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
            time.sleep(COALESCE_S)  # let the rest of the burst arrive
            self.flush()
