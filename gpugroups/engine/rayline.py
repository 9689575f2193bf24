"""The direct line between a ``RayWorker`` and its ``DeviceActor``: prompts without Ray's per-call cost.

Any call to a Ray actor costs about 1.7 ms on a loaded 2-core machine, whatever it carries
(``bench/bench_ray.py`` prints it as ``ray_bare_call_ms``): most of a small pass, and beyond the
2 ms a Ray device may add to ``process``. So ``process`` and ``cancel`` travel on a TCP socket the
actor opens on its node's address (the one Ray's own nodes reach each other by), as pickled
messages framed by ``multiprocessing.connection``; before either side reads a message, each
proves to the other that it holds the actor's random key (that module's HMAC challenge). Ray
still makes, places, adopts, pings and ends the actor and carries every other call. Calls on the
line take their numbers from the same count as the calls over Ray, and ``InOrder`` on the actor
lets each caller's calls through in that order, whichever way they came. Where the line cannot
be opened (a firewall between the nodes), the worker sends everything over Ray.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

from ..errors import GpuGroupsError
from .remote import Outcome, outcome
from .worker import ThreadWorker

log = logging.getLogger(__name__)

#: How long the manager's end waits for the actor's node to take the connection.
CONNECT_S = 5.0
#: Where a line is found: the actor's node address, its port, and the key that opens it.
Address = tuple[str, int, bytes]


class InOrder:
    """Ray starts a threaded actor's calls on its threads in no set order, and the line's calls
    come on a thread of their own: here each caller's calls pass in the order it numbered them,
    so they reach the worker in the order sent (an unload after the requests sent before it, a
    load after the unloads that make room for it)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next: dict[str, int] = {}  # caller -> the number of its next call

    @contextmanager
    def turn(self, caller: str, number: int) -> Iterator[None]:
        """Wait for the caller's calls numbered below ``number``; the body runs before its next."""
        with self._cv:
            self._cv.wait_for(lambda: self._next.get(caller, 0) == number)
            try:
                yield
            finally:
                self._next[caller] = number + 1
                self._cv.notify_all()


def _opened(sock: socket.socket, key: bytes, first: bool) -> Connection:
    """``sock`` as a message connection whose other end has shown it holds ``key`` (and been shown
    that this end does: the side that accepted (``first``) challenges first)."""
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a long message goes as two writes
    conn = Connection(sock.detach())
    try:
        if first:
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
        else:
            answer_challenge(conn, key)
            deliver_challenge(conn, key)
    except BaseException:
        conn.close()
        raise
    return conn


def _hang_up(conn: Connection) -> None:
    """End ``conn`` so that a thread blocked reading it wakes (closing alone would not wake it)."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # ended already
    conn.close()


class LineServer:
    """The actor's end: takes the line of each manager attached to the actor and runs its
    ``process`` and ``cancel`` calls on the actor's worker, in their turn, answering each
    ``process`` on the line with ``(number, outcome)`` once it is done."""

    def __init__(
        self, host: str, worker: ThreadWorker, order: InOrder, error: Callable[[BaseException], GpuGroupsError],
        touch: Callable[[], None],
    ) -> None:
        self._worker = worker
        self._order = order
        self._error = error
        self._touch = touch  # a manager is using the device: the idle clock restarts
        self._key = secrets.token_bytes(32)
        self._socket = socket.create_server((host, 0))
        self.address: Address = (host, self._socket.getsockname()[1], self._key)
        threading.Thread(target=self._accept, name="gpugroups-line-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._socket.accept()
            except OSError:
                return
            # each line on a thread of its own: one that never answers its challenge holds only that
            threading.Thread(target=self._serve, args=(sock,), name="gpugroups-line", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            conn = _opened(sock, self._key, first=True)
        except (AuthenticationError, EOFError, OSError):
            log.warning("gpugroups: refused a line to this device that did not hold its key")
            return
        sending = threading.Lock()

        def answer(number: int, done: Future[Any]) -> None:
            message = (number, outcome(done, self._error))
            with sending:
                try:
                    conn.send(message)
                except (OSError, ValueError):
                    pass  # the manager is gone; this line's reader ends on it

        try:
            caller = conn.recv()
            while True:
                number, op, args = conn.recv()
                with self._order.turn(caller, number):
                    if op == "process":
                        self._touch()
                        self._worker.process(*args).add_done_callback(functools.partial(answer, number))
                    else:
                        self._worker.cancel(*args)
        except (EOFError, OSError):
            pass  # the manager hung up
        except Exception:
            log.exception("gpugroups: a line to this device failed; it is closed (its manager loses the device)")
        finally:
            _hang_up(conn)


class Line:
    """The manager's end: numbered calls out (``send``); each answer, ``(number, outcome)``, to
    ``answer``; ``broken`` once if the line ends before ``close`` (the actor or its node is gone)."""

    def __init__(
        self, address: Address, caller: str, answer: Callable[[int, Outcome], None], broken: Callable[[], None]
    ) -> None:
        host, port, key = address
        self._conn = _opened(socket.create_connection((host, port), timeout=CONNECT_S), key, first=False)
        try:
            self._conn.send(caller)
        except OSError:
            self._conn.close()  # not left open behind a line that never was
            raise
        self._answer = answer
        self._broken = broken
        self._closed = False
        self._sending = threading.Lock()
        threading.Thread(target=self._read, name=f"gpugroups-line-{host}:{port}", daemon=True).start()

    def send(self, number: int, op: str, *args: Any) -> None:
        """Send call ``number``: ``op`` (``"process"`` or ``"cancel"``) with ``args``. Raises
        ``OSError`` (or ``ValueError``, closed) when the line is down."""
        with self._sending:
            self._conn.send((number, op, args))

    def close(self) -> None:
        """Hang up (the actor's end of it ends too); pending answers are not awaited."""
        self._closed = True
        _hang_up(self._conn)

    def _read(self) -> None:
        try:
            while True:
                number, answer = self._conn.recv()
                self._answer(number, answer)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("gpugroups: the line to a Ray device failed")
        if not self._closed:
            self._broken()


def open_line(address: Address | None, caller: str, answer: Callable[[int, Outcome], None], broken: Callable[[], None]) -> Line | None:
    """A line to the actor at ``address``, or None (logged) where it cannot be opened: the calls
    then go over Ray."""
    if address is None:
        return None
    try:
        return Line(address, caller, answer, broken)
    except (AuthenticationError, EOFError, OSError) as exc:
        log.warning("gpugroups: no direct line to the Ray device at %s:%s (%s: %s); its prompts go over Ray calls",
                    address[0], address[1], type(exc).__name__, exc)  # fmt: skip
        return None
