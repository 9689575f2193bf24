"""Load progress bars for scripts and notebook cells: tqdm's auto bar, fed by ``load_progress`` events.

The bar follows the same events the panel shows. It appears only for a load this call runs
and only once the load has taken ``DELAY_S`` (so a switch, an already loaded group or an instant
load prints nothing), and it is off with ``Manager(progress=False)`` or ``GPUGROUPS_PROGRESS=0``.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType
from typing import IO, Any

from .bus import Event, EventBus

#: The environment variable that turns the bars off ("0", "false", "no", "off").
ENV = "GPUGROUPS_PROGRESS"
#: Seconds a load runs before its bar shows (no tqdm bar is made before).
DELAY_S = 0.5
#: How long a finished load waits for its last events to be delivered (they are on the bus thread).
_SETTLE_S = 2.0

#: What ``Manager(progress=...)`` takes: None (on unless ``GPUGROUPS_PROGRESS`` is off), a bool,
#: or a text file to write a plain bar to (instead of the auto bar: a widget in a notebook).
ProgressOption = bool | IO[str] | None


def check_option(option: Any) -> ProgressOption:
    """``option`` if ``Manager(progress=...)`` accepts it, else ``invalid_request``."""
    from ..errors import GpuGroupsError

    if option is None or isinstance(option, bool) or hasattr(option, "write"):
        return option  # type: ignore[no-any-return]
    raise GpuGroupsError("invalid_request", f"progress must be None, True, False or a text file, got {option!r}")


class LoadBar:
    """A context around one load call: subscribes to the bus, draws the bar, completes it on success.

    The caller sets ``loaded`` to whether the call really loaded; only then, and only if the
    call took long enough for the bar to show (``DELAY_S``), does the exit wait (briefly) for the
    load's last events and fill the bar to 100 %. The bar takes only the events emitted after
    the delay: a faster load neither makes a bar nor wakes the bus thread for one (a wake-up
    per event measurably slowed the load's own thread).
    """

    def __init__(self, bus: EventBus, group_id: str, option: ProgressOption) -> None:
        self.loaded = False
        self._bus, self._group_id = bus, group_id
        self._file = None if option is None or isinstance(option, bool) else option
        self._bar: Any = None
        self._done = False
        self._lock = threading.Lock()
        self._on = enabled(option)
        self._began = time.monotonic()
        self._unsubscribe = (
            bus.subscribe(self._on_event, built=False, after=self._began + DELAY_S) if self._on else _nothing
        )

    def __enter__(self) -> LoadBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._on:
            return
        waited = time.monotonic() - self._began
        shown = exc_type is None and self.loaded and waited >= DELAY_S
        if shown:
            self._bus.settle(_SETTLE_S)  # the load's last events drawn before the bar is filled
        with self._lock:
            self._done = True
            bar, self._bar = self._bar, None
        self._unsubscribe()
        if shown and bar is None:  # no event came after the delay: the bar shows filled
            bar = _make_bar(self._group_id, self._file, waited)
        if bar is not None:
            if shown:
                bar.set_postfix_str("ready", refresh=False)
                bar.update(bar.total - bar.n)
            bar.close()

    def _on_event(self, event: Event) -> None:
        if event.get("type") != "load_progress" or event.get("group_id") != self._group_id:
            return
        with self._lock:
            if self._done:
                return
            if self._bar is None:
                self._bar = _make_bar(self._group_id, self._file, time.monotonic() - self._began)
            n = round(100 * float(event.get("progress", 0.0)))
            self._bar.set_postfix_str(str(event.get("stage", "")), refresh=False)
            self._bar.update(max(0, n - self._bar.n))


def enabled(option: ProgressOption) -> bool:
    """Whether bars show: ``option`` True or a file, or None with ``GPUGROUPS_PROGRESS`` not off."""
    if option is None:
        return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    return option is not False


def _nothing() -> None:
    pass


def _make_bar(group_id: str, file: IO[str] | None, waited: float) -> Any:
    """tqdm's auto bar (a widget in a notebook, text elsewhere), or a text bar on ``file``, shown
    at once and timed from the load's start, ``waited`` seconds ago."""
    if file is None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    # monitor_interval=0: no tqdm monitor thread left running in the user's process for our bars.
    bar_class = type("LoadProgressBar", (tqdm,), {"monitor_interval": 0})
    bar = bar_class(total=100, desc=f"loading {group_id}", unit="%", file=file, leave=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
    if not bar.disable:  # tqdm turned off (``TQDM_DISABLE``) keeps no clock
        bar.start_t -= waited  # its elapsed time is the load's
    return bar
