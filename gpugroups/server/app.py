"""The Jupyter server extension: builds the host policy (``GpuGroupsHost``, which owns its settings)
and hands it and the routes to the server.

Enabled on install (``jupyter-config/jupyter_server_config.d/gpugroups.json``). Configure it as
``c.GpuGroupsHost.<setting>`` in ``jupyter_server_config.py`` or ``--GpuGroupsHost.<setting>=...``.
Starting the server only builds the host policy; kernels start on first use.
"""

from __future__ import annotations

import gc
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Int
from traitlets.config import Config

from . import handlers, websocket
from .host import GpuGroupsHost


class GpuGroupsApp(ExtensionApp):
    """Serves ``/api/v2`` (REST + WebSocket) from the manager in the host kernel."""

    name = "gpugroups"
    host: GpuGroupsHost | None = None  # None when its settings were refused: the server still starts and stops
    load_other_extensions = True
    classes = [*ExtensionApp.classes, GpuGroupsHost]  # noqa: RUF012  # traitlets' own shape: the app's configurables

    full_gc_every = Int(
        100,
        config=True,
        help="""Python's third collector threshold in the server process, raised to this if lower:
        a full collection runs at most once per this many middle-generation ones (Python's own: 10).
        With hundreds of event sockets a full collection stops the server for 30-50 ms (what the
        sockets keep alive is too young for the freeze at start-up); at 10 one fell on 1-3 of every
        100 state changes' fan-out, at 100 none did (``bench/bench_ws.py``). Old cyclic garbage waits
        longer for it. 0 leaves the collector as it is.""",
    )

    def initialize_settings(self) -> None:
        """Build the host policy (nothing starts yet) and share it with the handlers."""
        assert self.serverapp is not None  # initialize_settings runs once linked to the server
        self.host = GpuGroupsHost(
            parent=self, config=self._host_config(), kernel_manager=self.serverapp.kernel_manager
        )
        self.settings["gpugroups_host"] = self.host

    def _host_config(self) -> Config:
        """The config, with the host's settings given the pre-0.2 way (``GpuGroupsApp.<setting>``)
        moved to ``GpuGroupsHost``; a setting given both ways keeps its ``GpuGroupsHost`` value."""
        config = Config(self.config)
        names = GpuGroupsHost.class_trait_names(config=True)
        old: dict[str, Any] = {k: v for k, v in self.config.get(type(self).__name__, {}).items() if k in names}
        if old:
            self.log.warning(
                "gpugroups: configure GpuGroupsHost.<setting> instead of the deprecated %s",
                ", ".join(f"GpuGroupsApp.{k}" for k in sorted(old)),
            )
            config.GpuGroupsHost = Config({**old, **self.config.get("GpuGroupsHost", {})})
        return config

    def initialize_handlers(self) -> None:
        # The socket before the REST routes: those end with the JSON 404 catch-all.
        self.handlers.extend([*websocket.default_handlers, *handlers.default_handlers])

    async def _start_jupyter_server_extension(self, serverapp: object) -> None:
        """Once the loop runs: watch for a notebook's ``gg.serve()`` from the start (so sockets
        hear of it at once); an auto host still waits for first use.

        Everything the server made while starting (modules, classes, settings) lives as long as the
        server: ``gc.freeze`` takes it out of the collector's sight, so that a full collection walks
        only what came after. At 500 event sockets such a collection otherwise stopped the whole
        fan-out for 150-200 ms about once in 20 changes (``bench/bench_ws.py``: p99 200 -> 75 ms).
        What comes after (the sockets' own objects) is the reason for ``full_gc_every``.
        """
        gc.freeze()
        young, middle, full = gc.get_threshold()
        if full < self.full_gc_every:
            gc.set_threshold(young, middle, self.full_gc_every)
        if self.host is not None:
            self.host.start()

    async def stop_extension(self) -> None:
        """Detach from the host; the server shuts its kernels (an auto-started host too) down itself."""
        if self.host is not None:
            await self.host.stop()
