"""``gg.manager()``: the one manager of this process, made on first use with what the
environment asks for (``kernelenv``: the devices and Ray namespace a server sets for its host).
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import GpuGroupsError
from ..kernelenv import manager_options
from .manager import Manager

_default: Manager | None = None
_default_lock = threading.Lock()


def default_manager(**kwargs: Any) -> Manager:
    """This process's manager, created on the first call with ``kwargs`` over what the environment
    asks for (``$GPUGROUPS_DEVICES``, ``$GPUGROUPS_RAY_NAMESPACE``: see ``kernelenv``)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Manager(**{**manager_options(), **kwargs})
        elif kwargs:
            raise GpuGroupsError("invalid_request", "gg.manager() already exists; pass options on its first call only")
        return _default
