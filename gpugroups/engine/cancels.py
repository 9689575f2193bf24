"""Which device has each ``process`` request, so ``Manager.cancel(request_id)`` reaches its worker;
and the ids cancelled before their request reached a device, so that request never starts.

Plain bookkeeping, guarded by the manager's lock (every method is called under it).
"""

from __future__ import annotations

from collections import OrderedDict

from .calls import cancelled

#: Ids cancelled before their request reached a worker, remembered (the latest ones) so it never starts.
EARLY_CANCELS = 1024


class Cancels:
    """Request ids -> the device whose worker has the request; early cancels, bounded."""

    def __init__(self) -> None:
        self._on: dict[str, int] = {}
        self._early: OrderedDict[str, None] = OrderedDict()

    def queued(self, request_id: str, device_id: int) -> None:
        """The request is about to be queued on ``device_id``; ``cancelled`` if it was cancelled already."""
        if request_id in self._early:
            del self._early[request_id]
            raise cancelled(request_id)
        self._on[request_id] = device_id

    def done(self, request_id: str) -> None:
        self._on.pop(request_id, None)

    def cancel(self, request_id: str) -> int | None:
        """The device whose worker must cancel it; None (and remembered) if it is on none yet."""
        device_id = self._on.get(request_id)
        if device_id is None:
            self._early[request_id] = None
            while len(self._early) > EARLY_CANCELS:
                self._early.popitem(last=False)
        return device_id
