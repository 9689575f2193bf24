"""A real ipykernel whose start leaves a wide gap between "answers on control" and "can create
subshells", the gap ipykernel 7 leaves for a few milliseconds when a busy machine delays the
kernel's main thread. A ``create_subshell_request`` that lands in it fails inside the kernel and
gets no reply; the bridge must ask again. Used through the ``gpugroups-slow-start`` kernel spec."""

from __future__ import annotations

import asyncio
import time

from ipykernel.ipkernel import IPythonKernel

#: Seconds the main thread stalls with control already dispatching.
STALL = 3.0


class SlowStartKernel(IPythonKernel):
    def start(self) -> None:
        # What Kernel.start does first (the lock, then control dispatch), then the stall, then
        # all of Kernel.start: it creates the subshell manager and starts the shell.
        self._control_lock = asyncio.Lock()
        self.control_stream.on_recv(self.dispatch_control, copy=False)
        time.sleep(STALL)
        super().start()
