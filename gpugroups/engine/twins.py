"""The ``a``-prefixed awaitable twins of the Manager's slow methods, written out so IDEs and mypy see them.

Each runs its synchronous twin in a thread (``asyncio.to_thread``), so an event loop stays free
while a load or a forward pass runs; a test keeps this list in step with the ops table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from .calls import new_request_id

if TYPE_CHECKING:
    from ..schema import ClearResult, LoadResult, PinResult, ProcessResult, UnloadResult

P = ParamSpec("P")
T = TypeVar("T")


class AwaitableTwins:
    """Mixin of ``Manager``: ``await m.aload(...)`` is ``m.load(...)`` in a thread."""

    # the synchronous twins, defined by ``Manager``
    load: Callable[..., LoadResult]
    load_group: Callable[..., LoadResult]
    unload: Callable[..., UnloadResult]
    unload_group: Callable[..., UnloadResult]
    clear_device: Callable[..., ClearResult]
    pin: Callable[..., PinResult]
    unpin: Callable[..., PinResult]
    process: Callable[..., ProcessResult]
    cancel: Callable[[str], None]
    run: Callable[..., Any]

    async def aload(self, model_id: str, device_id: int | None = None, device_ids: list[int] | None = None) -> LoadResult:
        """Awaitable ``load``."""
        return await asyncio.to_thread(self.load, model_id, device_id, device_ids)

    async def aload_group(
        self, group_id: str, device_id: int | None = None, device_ids: list[int] | None = None
    ) -> LoadResult:
        """Awaitable ``load_group``."""
        return await asyncio.to_thread(self.load_group, group_id, device_id, device_ids)

    async def aunload(self, model_id: str, device_id: int | None = None) -> UnloadResult:
        """Awaitable ``unload``."""
        return await asyncio.to_thread(self.unload, model_id, device_id)

    async def aunload_group(self, group_id: str, device_id: int | None = None) -> UnloadResult:
        """Awaitable ``unload_group``."""
        return await asyncio.to_thread(self.unload_group, group_id, device_id)

    async def aclear_device(self, device_id: int) -> ClearResult:
        """Awaitable ``clear_device``."""
        return await asyncio.to_thread(self.clear_device, device_id)

    async def apin(
        self, group_id: str, device_id: int | None = None, pinned: bool = True, device_ids: list[int] | None = None
    ) -> PinResult:
        """Awaitable ``pin``."""
        return await asyncio.to_thread(self.pin, group_id, device_id, pinned, device_ids)

    async def aunpin(self, group_id: str) -> PinResult:
        """Awaitable ``unpin``."""
        return await asyncio.to_thread(self.unpin, group_id)

    async def aprocess(
        self,
        model_id: str,
        prompt: str,
        num_predictions: int = 3,
        device_id: int | None = None,
        max_new_tokens: int = 0,
        *,
        request_id: str | None = None,
    ) -> ProcessResult:
        """Awaitable ``process``; cancelling the awaitable cancels the request (``Manager.cancel``),
        as does ``cancel(request_id)`` from elsewhere."""
        request_id = request_id or new_request_id()
        try:
            return await asyncio.to_thread(
                self.process, model_id, prompt, num_predictions, device_id, max_new_tokens, request_id=request_id
            )
        except asyncio.CancelledError:
            self.cancel(request_id)
            raise

    async def arun(
        self, model_id: str, fn: Callable[Concatenate[Any, Any, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Awaitable ``run``."""
        return await asyncio.to_thread(self.run, model_id, fn, *args, **kwargs)
