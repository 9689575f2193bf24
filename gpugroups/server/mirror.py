"""The host's state as the server last heard it, so that state reads need no trip to the kernel.

Every change in the host's manager reaches the server as a ``state_update`` event carrying the
whole state; the mirror keeps the newest. It answers ``state``, ``models`` and ``groups`` while
it is fresh, and the kernel answers otherwise:

- after any other request completes (it may have changed the state, and its event can arrive
  after its reply), until a read from the kernel gives a version to go on from: a client always
  reads its own writes;
- when the newest state is older than ``max_age`` seconds (device memory figures move without
  events);
- when there is no host, or a new one has not been read yet.
"""

from __future__ import annotations

import time
from typing import Any

#: The reads the mirror answers, and the part of the state each returns.
READS: dict[str, str | None] = {"state": None, "models": "models", "groups": "groups"}


class StateMirror:
    """The newest state of the current host, and whether it may answer a read."""

    def __init__(self, max_age: float = 2.0) -> None:
        self.max_age = max_age
        self._state: dict[str, Any] | None = None
        self._at = 0.0
        self._pending = 0  # other requests in flight: their effects may not be in the mirror yet
        self._epoch = 0  # bumped when one is answered: kernel reads sent before then are too old

    def answer(self, op: str) -> Any | None:
        """The answer to read ``op`` from the mirror, or None when the kernel must answer."""
        if op not in READS or self._state is None or self._pending:
            return None
        if time.monotonic() - self._at > self.max_age:
            return None
        part = READS[op]
        return self._state if part is None else self._state[part]

    def heard(self, message: dict[str, Any]) -> None:
        """An event from the host: keep its state if it is newer than the mirror's. A ``system_state``
        (the host serves another manager, whose versions start again) clears the mirror."""
        state = message.get("state")
        if message.get("type") not in ("state_update", "system_state") or not isinstance(state, dict):
            return
        if message["type"] == "system_state":
            self.clear()
            return
        if self._state is not None and state.get("version", -1) >= self._state.get("version", -1):
            self._keep(state)

    def ticket(self) -> int:
        """Taken before a read goes to the kernel, given back to ``read`` with its answer."""
        return self._epoch

    def read(self, state: dict[str, Any], ticket: int) -> None:
        """A state the kernel answered: the mirror goes on from it, unless another request was
        answered since the read was sent (the read may predate its effects) or is still running."""
        newer = self._state is None or state.get("version", -1) >= self._state.get("version", -1)
        if ticket == self._epoch and not self._pending and newer:
            self._keep(state)

    def started(self) -> None:
        """Another request goes to the kernel: reads go there too until it is answered."""
        self._pending += 1

    def finished(self) -> None:
        """That request is answered; the next read goes to the kernel and sets the mirror anew."""
        self._pending -= 1
        self._epoch += 1
        self._state = None

    def clear(self) -> None:
        """The host changed or was lost: nothing heard so far describes the next one."""
        self._epoch += 1
        self._state = None

    def _keep(self, state: dict[str, Any]) -> None:
        self._state, self._at = state, time.monotonic()
