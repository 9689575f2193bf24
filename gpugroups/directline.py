"""The bridge's direct line: requests and replies on a socket of their own between the server and
the host kernel, beside the comm, which keeps the hello, the pushed events and the fallback.

Through the comm a request takes two trips through ipykernel's channels: in on shell (the shell
channel thread routes it to the subshell) and out on IOPub (the IOPub thread, then every
subscriber). Those trips were 2.6 ms of a REST call's 7 on a 2-core machine. The direct line is
one ZeroMQ DEALER (server) to ROUTER (kernel) pair: a thread in the kernel owns the ROUTER,
hands requests to the same handler as the comm and sends the replies the handler's pool threads
queue for it.

It is as private as the kernel's own channels: the kernel binds it on the interface and transport
of its connection file, and every message is signed with the kernel's key (the HMAC of
``Session.sign``, checked in constant time); an unsigned or wrongly signed message is dropped. A
message is two frames, ``[signature, body]`` (the ROUTER adds the peer's identity in front), the
body packed by the session as comm content is. The server pings the line once when it attaches
and uses the comm instead if no pong comes back. Light: zmq and the standard library only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

import zmq
import zmq.asyncio

#: Seconds the server waits for the line's pong before it keeps to the comm.
PING_TIMEOUT = 2.0

log = logging.getLogger(__name__)


def _frames(session: Any, data: Mapping[str, Any]) -> list[bytes]:
    body: bytes = session.pack(data)
    return [session.sign([body]), body]


def _unframe(session: Any, frames: list[bytes]) -> Any | None:
    """The data of ``[signature, body]``, or None when the signature is not the session's."""
    if len(frames) != 2 or not hmac.compare_digest(frames[0], session.sign([frames[1]])):
        return None
    try:
        return session.unpack(frames[1])
    except ValueError:
        return None


def _address(ip: str, transport: str) -> str:
    """Where to bind, on the kernel's own interface and transport."""
    if transport == "ipc":
        return f"ipc://{ip}-gpugroups-{uuid.uuid4().hex[:12]}"
    return f"tcp://{ip}"


#: What a kernel line calls with each message: its data, and a function that answers its sender.
Handler = Callable[[Any, Callable[[Mapping[str, Any]], None]], None]


class KernelLine:
    """The kernel's end: a ROUTER bound next to the kernel's channels, served by one thread.

    ``handle(data, answer)`` gets each message on that thread; it must hand slow work to other
    threads. ``answer(reply)`` sends the reply to that message's sender, from any thread (it is
    queued, and the line's thread sends it)."""

    def __init__(self, session: Any, handle: Handler, ip: str = "127.0.0.1", transport: str = "tcp") -> None:
        self._session = session
        self._handle = handle
        self._socket: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        where = _address(ip, transport)
        if transport == "ipc":
            self._socket.bind(where)
            self.address = where
        else:
            self.address = f"{where}:{self._socket.bind_to_random_port(where)}"
        self._outbox: deque[tuple[bytes, Mapping[str, Any]]] = deque()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="gpugroups-direct-line", daemon=True)
        self._thread.start()

    def _answerer(self, peer: bytes) -> Callable[[Mapping[str, Any]], None]:
        def answer(data: Mapping[str, Any]) -> None:
            self._outbox.append((peer, data))
            self._wake()

        return answer

    def stop(self) -> None:
        """Stop the thread and close the socket (what is queued is dropped: the server is gone)."""
        self._stopped = True
        self._wake()
        self._thread.join(timeout=2)

    def _wake(self) -> None:
        try:
            self._wake_out.send(b"\0")
        except (BlockingIOError, OSError):  # already woken (buffer full) or stopped
            pass

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_in.fileno(), zmq.POLLIN)
        try:
            while not self._stopped:
                for ready, _ in poller.poll():
                    if ready is self._socket:
                        self._receive()
                    else:
                        self._drain_wake()
                self._flush()
        finally:
            self._socket.close(linger=0)
            self._wake_in.close()
            self._wake_out.close()

    def _receive(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            data = _unframe(self._session, frames[1:])
            if data is None:
                log.warning("gpugroups: dropped an unsigned or malformed message on the direct line")
                continue
            answer = self._answerer(frames[0])
            if isinstance(data, dict) and "ping" in data:
                answer({"pong": data["ping"]})
                continue
            try:
                self._handle(data, answer)
            except Exception:  # the line outlives any one request
                log.exception("gpugroups: the direct line's handler failed")

    def _drain_wake(self) -> None:
        try:
            while self._wake_in.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _flush(self) -> None:
        while self._outbox:
            peer, data = self._outbox.popleft()
            self._socket.send_multipart([peer, *_frames(self._session, data)])


async def answering_line(session: Any, address: str, on_data: Callable[[Any], None]) -> ServerLine | None:
    """A ``ServerLine`` to the kernel's line at ``address`` that answered its ping; None (closed,
    and logged) when it did not, and the kernel's requests then take the comm."""
    line = ServerLine(session, address, on_data)
    if await line.ping():
        return line
    line.close()
    log.warning("gpugroups: the kernel's direct line %s did not answer; requests take the comm", address)
    return None


class ServerLine:
    """The server's end: a DEALER connected to a kernel's line, read by one asyncio task that gives
    each message's data to ``on_data``. Used from the server's event loop only."""

    def __init__(self, session: Any, address: str, on_data: Callable[[Any], None]) -> None:
        self._session = session
        self._on_data = on_data
        self.address = address
        self._socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._socket.linger = 0
        self._socket.connect(address)
        self._pong: asyncio.Future[None] | None = None
        self._reader = asyncio.ensure_future(self._read())

    async def ping(self, timeout: float = PING_TIMEOUT) -> bool:
        """Whether the kernel answers on this line within ``timeout`` seconds."""
        self._pong = asyncio.get_running_loop().create_future()
        self.send({"ping": os.getpid()})
        try:
            await asyncio.wait_for(self._pong, timeout)
            return True
        except TimeoutError:
            return False

    def send(self, data: Mapping[str, Any]) -> None:
        """Send ``data`` to the kernel (queued by zmq; never blocks the event loop). Raises
        ``zmq.Again`` when a thousand messages already wait for a kernel that reads none."""
        sent = cast("asyncio.Future[Any]", self._socket.send_multipart(_frames(self._session, data), zmq.NOBLOCK))
        failed = sent.exception() if sent.done() else None
        if failed is not None:
            raise failed

    def close(self) -> None:
        self._reader.cancel()
        self._socket.close(linger=0)

    async def _read(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            data = _unframe(self._session, frames)
            if not isinstance(data, dict):
                continue
            if "pong" in data:
                if self._pong is not None and not self._pong.done():
                    self._pong.set_result(None)
                continue
            try:
                self._on_data(data)
            except Exception:  # the reader outlives any one message
                log.exception("gpugroups: a message on the direct line failed")
