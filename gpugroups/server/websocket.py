"""``WS /api/v2/ws``: the host's state on connect, then every event as it happens.

Messages to the client: ``{"type": "system_state", "version", "state"}`` on connect, on
``{"type": "get_state"}``, when a new host kernel takes over (with its ``host``) and when the
host kernel serves another manager (``gg.serve(m2)``: its versions start again);
``state_update`` and ``load_progress`` events from the manager; ``{"type": "error", "error":
{"code", "message"}}`` (``host_unavailable`` when the host is lost, ``invalid_request`` for a
message it does not understand). Events that race a state fetch are held back and the ones it
already covers dropped, as are events that arrive after it but are older than the state it sent
(a state read may be answered ahead of the event stream), so versions only go up between two
``system_state`` messages.

Each socket has one message on its way at a time: the rest wait in an outbox, coalesced (latest
state wins), so a client that stops reading costs the server one pending state, not one per change.
A client that does not take a message within ``GpuGroupsHost.ws_send_timeout`` is closed.

Fan-out is the hot path (one event, hundreds of sockets): an event becomes one WebSocket frame,
built once for all of them and written straight to each socket's stream (tornado's
``write_message`` would encode again and start a task per socket). A write the kernel takes at
once (the usual case) leaves nothing behind; only one it cannot take yet gets a done-callback and
the deadline timer.
"""

from __future__ import annotations

import json
import socket
import struct
from asyncio import Future
from collections import deque
from typing import Any

from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado import websocket
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from ..errors import GpuGroupsError
from ..events import Event, coalesce
from ..protocol import API_PREFIX, LEGACY_PREFIX, parse_json
from .handlers import AUTH_RESOURCE, JsonErrors, Legacy
from .host import GpuGroupsHost

#: Bytes of the largest message a client may send on the socket.
MAX_CLIENT_MESSAGE = 4096


class EventsSocket(Legacy, JsonErrors, WebSocketMixin, websocket.WebSocketHandler, JupyterHandler):
    """One client's event stream (origin-checked by ``WebSocketMixin``). A refused upgrade (no
    token: 403; a foreign page's cookie: 403; not a WebSocket request: 400) answers the JSON error
    of the REST routes, not tornado's text or Jupyter's HTML page."""

    auth_resource = AUTH_RESOURCE

    def set_default_headers(self) -> None:
        """No page headers (CSP etc.) on a WebSocket upgrade, as jupyter_server's kernel socket;
        only ``/api/v1``'s deprecation headers."""
        self._deprecation_headers()

    @property
    def host(self) -> GpuGroupsHost:
        host: GpuGroupsHost = self.settings["gpugroups_host"]
        return host

    @property
    def max_message_size(self) -> int:
        """The largest message a client may send (a larger one closes the socket, 1009, before it
        is buffered or parsed on the server's loop): the one it understands, ``get_state``, is tiny."""
        return MAX_CLIENT_MESSAGE

    @ws_authenticated
    @authorized
    async def get(self, *args: Any, **kwargs: Any) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise GpuGroupsError("invalid_request", f"{self.request.path} takes WebSocket upgrades only")
        origin = self.request.headers.get("Origin")
        if origin is not None and not self.check_origin(origin):
            raise GpuGroupsError("forbidden", f"cross-origin WebSocket from {origin} refused (not in ServerApp.allow_origin)")
        await super().get(*args, **kwargs)

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open(*args, **kwargs)
        stream = self.ws_connection.stream if self.ws_connection is not None else None
        if stream is not None and stream.socket is not None:  # see SEND_BUFFER
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._fetching = 0
        self._floor: int | None = None  # the version of the last whole state sent: older events are stale
        self._held: list[Event] = []
        self._outbox: list[Event] = []
        self._in_flight: Future[None] | None = None
        self._deadline: object | None = None
        self.host.add_listener(self._on_event)
        self._request_state()

    def on_message(self, message: str | bytes) -> None:
        try:
            msg = parse_json(message, "the message")
        except GpuGroupsError as exc:
            self._write({"type": "error", "error": exc.to_json()})
            return
        if isinstance(msg, dict) and msg.get("type") == "get_state":
            self._request_state()
        else:
            error = GpuGroupsError("invalid_request", 'expected {"type": "get_state"}')
            self._write({"type": "error", "error": error.to_json()})

    def on_close(self) -> None:
        self.host.remove_listener(self._on_event)
        self._outbox.clear()
        self._stop_deadline()
        if self.ping_callback is not None:  # else it keeps this socket alive until its next tick
            self.ping_callback.stop()
            self.ping_callback = None

    def _request_state(self) -> None:
        """Fetch and send the whole state; events are held from now on until it is sent (one
        arriving before the fetch began went out first, ahead of the socket's ``system_state``)."""
        self._fetching += 1
        IOLoop.current().spawn_callback(self._send_state)

    async def _send_state(self) -> None:
        version = None
        try:
            state = await self.host.request("state")
            if not _whole(self._held):  # else a newer whole state (a new host or manager) is held
                version = self._floor = state["version"]
                self._write({"type": "system_state", "version": version, "state": state})
        except GpuGroupsError as exc:
            self._write({"type": "error", "error": exc.to_json()})
        finally:
            self._fetching -= 1
        if self._fetching == 0:
            held, self._held = self._held, []
            whole = _whole(held)  # then every held event is the new host's or manager's: all go
            for event in held:
                if whole or not _stale(event, version):
                    self._write(event)

    def _on_event(self, event: Event) -> None:
        if event.get("type") == "system_state":  # a new host or manager: its versions start again
            self._floor = event.get("version")
        if self._fetching:  # held, coalesced: a system_state supersedes the states before it
            self._held = _coalesced(self._held, event)
        elif not _stale(event, self._floor):
            self._write(event)

    def _write(self, message: Event) -> None:
        """Queue ``message`` for sending; superseded ones still waiting are dropped."""
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        if self._outbox or self._in_flight is not None:  # behind others: coalesce with them
            self._outbox = _coalesced(self._outbox, message)
            if len(self._outbox) > MAX_OUTBOX:
                self._give_up(f"{len(self._outbox)} messages it did not take")
                return
        else:  # the usual case in a fan-out, kept cheap
            self._outbox.append(message)
        self._pump()

    def _pump(self) -> None:
        """Hand waiting messages to the socket until one does not go out at once."""
        conn = self.ws_connection
        if conn is None or conn.is_closing() or conn.stream is None:
            return  # closed or closing: on_close clears up
        while self._in_flight is None and self._outbox:
            try:  # tornado's write_message would add a task and encode again for every socket
                sent = conn.stream.write(_frame(self._outbox.pop(0)))
            except StreamClosedError:
                return
            if not sent.done():  # the client's buffer is full: wait for it, within the deadline
                self._in_flight = sent
                self._deadline = IOLoop.current().call_later(self.host.ws_send_timeout, self._too_slow, sent)
                sent.add_done_callback(self._sent)
                return
            if sent.exception() is not None:  # a failed write closed the stream: on_close clears up
                return

    def _sent(self, sent: Future[None]) -> None:
        # Reading the exception marks it seen; a failed write means closed, and on_close clears up.
        failed = sent.cancelled() or sent.exception() is not None
        self._in_flight = None
        self._stop_deadline()
        if not failed:
            self._pump()

    def _too_slow(self, sent: Future[None]) -> None:
        if sent is self._in_flight and not sent.done():
            self._give_up(f"no message taken for {self.host.ws_send_timeout:g} s")

    def _stop_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None:
            IOLoop.current().remove_timeout(deadline)

    def _give_up(self, why: str) -> None:
        """Close a socket whose client does not read (it reconnects and gets the whole state)."""
        self.log.warning("gpugroups: closing a WebSocket that does not read (%s)", why)
        self.host.remove_listener(self._on_event)
        self._outbox.clear()
        self._stop_deadline()
        self.close(1008, "too slow: reconnect for the current state")


#: Bytes of the kernel's send buffer for each socket (Linux doubles it). Coalescing happens only
#: in the outbox, behind a write the socket has not taken: with the kernel's own buffer of up to
#: 4 MiB, hundreds of states went into it, and a client reading slower than the changes came
#: read them all, one by one, tens of seconds late.
SEND_BUFFER = 64 * 1024

#: Messages a socket's outbox may hold after coalescing (events that never supersede each other,
#: such as errors or progress of many operations) before the client counts as not reading.
MAX_OUTBOX = 256


def _stale(event: Event, floor: int | None) -> bool:
    """Whether ``event`` is a state change a whole state of version ``floor`` already covers."""
    return floor is not None and event.get("type") in ("state_update", "load_progress") and event["version"] <= floor


def _whole(events: list[Event]) -> bool:
    """Whether ``events`` hold a ``system_state``: a whole state from which versions start again."""
    return any(e.get("type") == "system_state" for e in events)


def _coalesced(queue: list[Event], message: Event) -> list[Event]:
    """``queue`` plus ``message``, less what ``message`` supersedes (latest state wins)."""
    return coalesce([*queue, message])


#: The last few messages sent and their frames. The host hands the same event object to every
#: socket, one after the other, so all but the first find it here; held by reference and matched
#: by identity, so an entry can never stand for another object.
_RECENT: deque[tuple[Event, bytes]] = deque(maxlen=4)


def _frame(message: Event) -> bytes:
    """``message`` as one whole WebSocket text frame (RFC 6455: FIN, opcode 1, no mask, as a
    server sends; uncompressed, as this handler keeps tornado's default of no per-message
    deflate), built once however many sockets send it."""
    for sent, frame in _RECENT:
        if sent is message:
            return frame
    data = json.dumps(message, separators=(",", ":")).encode()
    size = len(data)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size <= 0xFFFF:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    frame = head + data
    _RECENT.append((message, frame))
    return frame


#: The event socket, and its deprecated v1 alias (before the JSON 404 catch-all).
default_handlers = [
    (API_PREFIX + "/ws", EventsSocket, {"deprecated": False}),
    (LEGACY_PREFIX + "/ws", EventsSocket, {"deprecated": True}),
]
