"""The panel's kernel side: mirror a Manager's state into a synced trait, run the front end's actions.

The front end (``front/``: ``JS_PARTS`` and ``CSS_PARTS``, joined into one module and one style
sheet) reads the ``state`` trait (the state JSON of ``Manager.state()``), ``progress`` (the
latest ``load_progress`` per running operation) and ``spec`` (the ops table's facts: each op's
nature and its params' limits, from ``protocol``), and acts by custom messages
``{"action": OP, "request_id": ..., **args}`` where OP is an op of the ops table.
``sidebar_view`` marks the panel's view in JupyterLab's side panel, when it was opened there
(``sidebar.py``).
Actions run on a small thread pool, so a load never blocks the kernel's comm handling; manager
events arrive on the manager's threads and are coalesced before they reach the comm.

The front end's messages are handled where they were sent to. JupyterLab 4.4 and newer (and
Notebook 7) send widget messages on a kernel subshell. ipykernel 7, though, routes a comm's
incoming messages to wherever that comm last sent from, and the panel sends from pool and relay
threads, which count as the main shell. So every click would wait for a running cell. The
panel's comm therefore routes each incoming message by its own header.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from .. import protocol
from .._ipykernel import route_by_header
from ..errors import GpuGroupsError
from ..events import Coalescer
from .sidebar import closed as sidebar_closed
from .sidebar import open_in_sidebar

if TYPE_CHECKING:
    from ..engine.manager import Manager

#: The front end's source: the ES module's parts and the style sheet's parts.
FRONT_DIR = Path(__file__).resolve().parent / "front"
#: The module's parts, in the order they are joined into ``Panel._esm``: helpers, the three
#: sections, the view that holds them, then where a view shows and the ``export default``.
JS_PARTS = ("dom.js", "devices.js", "catalog.js", "prompt.js", "view.js", "placement.js")
#: The style sheet's parts, in the order they are joined into ``Panel._css`` (their cascade order).
CSS_PARTS = ("layout.css", "devices.css", "catalog.css", "controls.css", "narrow.css")

#: How long the relay waits after the first event of a burst before it publishes, so that a
#: load's handful of events reach the browser as one update (well inside the 200 ms goal).
COALESCE_S = 0.015
#: Actions that may run at once: a slow load on one device must not hold a prompt on another.
ACTION_WORKERS = 4


def _joined(parts: tuple[str, ...]) -> str:
    """The named files of ``FRONT_DIR`` as one text, in order, each headed by its name.

    anywidget loads ``_esm`` as one ES module from a string, where relative imports do not
    resolve; so the parts are joined here instead (no bundler, nothing to build) and share one
    module scope, where each uses what the others declare by name. The text is read once, at
    import, so anywidget's hot reload (``ANYWIDGET_HMR=1``), which watches an ``_esm`` given as
    one file's path, does not apply: after editing a part, restart the kernel.
    """
    return "\n".join(f"/* {name} */\n{(FRONT_DIR / name).read_text(encoding='utf-8')}" for name in parts)


class Panel(anywidget.AnyWidget):
    """Live view and controls for a ``Manager``: devices, catalog, prompt box.

    ``state`` follows every manager event; ``close()`` detaches from the manager.
    """

    _esm = _joined(JS_PARTS)
    _css = _joined(CSS_PARTS)

    state = traitlets.Dict().tag(sync=True)
    progress = traitlets.Dict().tag(sync=True)
    #: ``{"ops": protocol.ops_json()}``: the limits and op flags the front end uses.
    spec = traitlets.Dict().tag(sync=True)
    #: The mark of its view in JupyterLab's right side panel (its model id); "" when not opened there.
    sidebar_view = traitlets.Unicode("").tag(sync=True)

    def __init__(self, manager: Manager, *, sidebar: bool = False, **kwargs: Any) -> None:
        """A panel on ``manager``; ``sidebar=True`` also opens it in JupyterLab's right side panel."""
        super().__init__(state=manager.state(), spec={"ops": protocol.ops_json()}, **kwargs)
        self._manager = manager
        self._pool = ThreadPoolExecutor(ACTION_WORKERS, thread_name_prefix="gpugroups-panel")
        if self.comm is not None:  # route the front end's messages by their own subshell id
            route_by_header(self.comm)
        self._relay = _Relay(self._publish)
        self.on_msg(self._on_custom_msg)
        # Take a second snapshot after subscribing: an event between the first snapshot and
        # the subscription is then covered, and duplicates are dropped by version.
        self._unsubscribe: Callable[[], None] | None = manager.subscribe(self._relay.offer)
        self._relay.offer_snapshot(manager.state())
        self._relay.flush()
        self._sidecar: Any = None
        if sidebar:
            try:
                self._sidecar = open_in_sidebar(self)
            except Exception:
                self.close()
                raise

    @property
    def manager(self) -> Manager:
        """The manager this panel shows and drives."""
        return self._manager

    def close(self) -> None:
        """Detach from the manager, stop the relay and the action pool, close the comm (and its side-panel tab)."""
        sidecar, self._sidecar = getattr(self, "_sidecar", None), None
        if sidecar is not None:
            sidebar_closed(self)
            sidecar.close()
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
        except Exception as exc:
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


def _reply(action: Any, request_id: Any, result: Any) -> dict[str, Any]:
    """The answer to one action, in the panel contract's shape."""
    reply: dict[str, Any] = {"reply_to": action, "request_id": request_id}
    if isinstance(result, BaseException):
        reply.update(ok=False, error=protocol.error_json(result))
    else:
        reply.update(ok=True, result=result)
    return reply


class _Relay:
    """Fold coalesced manager events (from any thread) into few, ordered trait updates.

    Keeps the newest state by version (a snapshot an action took may be newer than an event
    still on its way) and the newest progress per operation; the ``Coalescer`` publishes them
    ``COALESCE_S`` after the first event of a burst. Progress of operations that the newest
    state no longer lists is dropped, so finished loads leave no bars behind.
    """

    def __init__(self, publish: Callable[[dict[str, Any] | None, dict[str, Any]], None]) -> None:
        self._publish = publish
        self._state: dict[str, Any] = {}
        self._version = -1
        self._progress: dict[str, dict[str, Any]] = {}
        self._events = Coalescer(self._fold, COALESCE_S, name="gpugroups-panel-relay")
        self.offer = self._events.offer
        self.flush = self._events.flush

    def offer_snapshot(self, state: Mapping[str, Any]) -> None:
        """Take a ``Manager.state()`` read now; it wins over an event of the same version."""
        self.offer({"type": "state_update", "version": state.get("version", 0), "state": state})

    def stop(self) -> None:
        """End the relay; pending events are dropped."""
        self._events.stop()

    def _fold(self, events: list[Mapping[str, Any]]) -> None:
        state = None
        for event in events:
            kind = event.get("type")
            if kind == "state_update" and event.get("version", -1) >= self._version:
                self._version, state = event["version"], event["state"]
            elif kind == "load_progress" and event.get("operation_id") is not None:
                self._progress[str(event["operation_id"])] = {
                    k: event.get(k) for k in ("group_id", "device_id", "progress", "stage", "version")
                }
        if state is not None:
            self._state = state
        live = {str(op.get("id")) for op in self._state.get("operations", [])}
        self._progress = {
            k: p for k, p in self._progress.items() if k in live or (p.get("version") or 0) > self._version
        }
        self._publish(state, dict(self._progress))
