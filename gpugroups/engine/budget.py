"""What one forward pass may take: the group's runtime reserve, as a limit on each pass.

The estimate reserves room for a reference batch (``estimate.runtime_reserve``); the worker may be
asked for more (32 rows, a prompt as long as the context, 100 continued predictions). A loaded
member's ``PassBudget`` holds that reserve and says what fits in it, device by device, so that
inference cuts a prompt or splits rows into passes rather than run past what the estimate set aside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .estimate import ShardReserve, reserve_parts

#: Longest prompt ``PassBudget.max_seq`` considers (beyond any model's context).
MAX_SEQ = 1 << 22


@dataclass(frozen=True)
class PassBudget:
    """The most one forward pass of a loaded member may take: on each device the member's pass
    runs on, the runtime reserve that device accounted for it, measured against the same device's
    part of the pass's own ``reserve_parts`` (its rows, tokens and the attention the loaded model
    really runs). A request larger than the reserve is cut to fit (rows split into several passes,
    a prompt shortened from the left) rather than run past it.

    One device holds the whole reserve, so a pass fits when its parts together do: 16 short rows
    need more logits than the reference batch's 8 but far fewer activations, and run as one pass.
    A member laid out layer by layer over several devices (``layout``: each device's decoder
    layers and whether it holds the output head, as ``ShardReserve.on`` splits the reserve) fits
    when every device's part does."""

    config: Mapping[str, Any]
    dtype: str
    reserve: ShardReserve
    attention: str | None = None
    #: ``(decoder layers, holds the head)`` per device of a layered member; empty: one device.
    layout: tuple[tuple[int, bool], ...] = ()
    #: ``max_seq`` by ``new_tokens``: asked for every request, answered once (a binary search).
    _longest: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def fits(self, batch: int, seq: int, new_tokens: int = 0) -> bool:
        """Whether ``batch`` rows of ``seq`` tokens (continued by ``new_tokens``) fit the reserve."""
        need = reserve_parts(self.config, self.dtype, batch, max(seq, 1), new_tokens, self.attention)
        if not self.layout:
            return sum(need) <= sum(self.reserve)
        total = sum(layers for layers, _ in self.layout)
        return all(need.on(layers, total, head) <= self.reserve.on(layers, total, head) for layers, head in self.layout)

    def max_seq(self, new_tokens: int = 0) -> int:
        """The longest prompt one row may have with ``new_tokens`` to follow (0: not one token)."""
        known = self._longest.get(new_tokens)
        if known is not None:
            return known
        lo, hi = 0, 1
        while hi <= MAX_SEQ and self.fits(1, hi, new_tokens):
            lo, hi = hi, hi * 2
        while hi - lo > 1 and lo:  # fits(lo) and not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(1, mid, new_tokens) else (lo, mid)
        self._longest[new_tokens] = min(lo, MAX_SEQ)
        return self._longest[new_tokens]

    def max_rows(self, seq: int, new_tokens: int = 0, most: int = 1 << 16) -> int:
        """How many rows of ``seq`` tokens one pass may take (at least 1: one row always runs)."""
        rows = 1
        while rows < most and self.fits(rows + 1, seq, new_tokens):
            rows += 1
        return rows
