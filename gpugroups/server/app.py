"""The Jupyter server extension: its configuration, and the bridge it hands to the handlers.

Enabled on install (``jupyter-config/jupyter_server_config.d/gpugroups.json``). Configure it as
``c.GpuGroupsApp.<trait>`` in ``jupyter_server_config.py`` or ``--GpuGroupsApp.<trait>=...``.
Starting the server only builds the bridge object; kernels start on first use.
"""

from __future__ import annotations

import os

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, CaselessStrEnum, Float, List, Unicode

from ..catalog import ROOTS_ENV
from . import handlers, websocket
from .bridge import Bridge


class GpuGroupsApp(ExtensionApp):
    """Serves ``/api/v2`` (REST + WebSocket) from the manager in the host kernel."""

    name = "gpugroups"
    load_other_extensions = True

    host_kernel = CaselessStrEnum(
        ["auto", "none"],
        default_value="auto",
        help="""With no host kernel (no notebook ran gg.serve()): "auto" starts one on first use
        (it shows among the running kernels, so a console can attach); "none" answers 503
        host_unavailable until a notebook runs gg.serve() or POST /api/v2/system/host names one.""",
    ).tag(config=True)

    kernel_name = Unicode(
        "", help="Kernel spec of the auto-started host kernel (default: the server's default kernel)."
    ).tag(config=True)

    request_timeout = Float(
        300.0, help="Seconds a REST request waits for the host kernel's answer before 504 timeout."
    ).tag(config=True)

    host_start_timeout = Float(
        120.0, help="Seconds to wait for a kernel to become the host (its first gg.serve() imports torch)."
    ).tag(config=True)

    model_roots = List(
        Unicode(),
        help=f"""Extra folders under which local model paths may be loaded by id, passed to the
        auto-started host kernel as ${ROOTS_ENV}. Paths outside the allowed roots are unknown_model.""",
    ).tag(config=True)

    trust_remote_code = Bool(
        False,
        help="""Let REST clients load groups marked trust_remote_code (they run code from the model
        folder). Off: such loads are refused over the API; a notebook can still load them.""",
    ).tag(config=True)

    use_subshells = Bool(
        True,
        help="""Open the bridge comm on a kernel subshell (ipykernel >= 7) so the API answers while a
        cell runs in the host kernel. False (or an older kernel) uses the main shell.""",
    ).tag(config=True)

    def initialize_settings(self) -> None:
        """Build the bridge (nothing starts yet) and share it with the handlers."""
        env = {}
        if self.model_roots:
            roots = [os.path.abspath(os.path.expanduser(r)) for r in self.model_roots]
            inherited = os.environ.get(ROOTS_ENV)
            env[ROOTS_ENV] = os.pathsep.join([*roots, *([inherited] if inherited else [])])
        self.bridge = Bridge(
            self.serverapp.kernel_manager,
            host_kernel=self.host_kernel,
            kernel_name=self.kernel_name,
            request_timeout=self.request_timeout,
            host_start_timeout=self.host_start_timeout,
            kernel_env=env,
            trust_remote_code=self.trust_remote_code,
            use_subshells=self.use_subshells,
            log=self.log,
        )
        self.settings["gpugroups_bridge"] = self.bridge

    def initialize_handlers(self) -> None:
        # The socket before the REST routes: those end with the JSON 404 catch-all.
        self.handlers.extend([*websocket.default_handlers, *handlers.default_handlers])

    async def _start_jupyter_server_extension(self, serverapp: object) -> None:
        """Once the loop runs: watch for a notebook's ``gg.serve()`` from the start (so sockets
        hear of it at once); an auto host still waits for first use."""
        self.bridge.start()

    async def stop_extension(self) -> None:
        """Detach from the host; the server shuts its kernels (an auto-started host too) down itself."""
        await self.bridge.stop()
