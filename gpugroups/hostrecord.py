"""The host record: the file by which a kernel that ran ``gg.serve()`` tells the Jupyter server it is
the host. Written by the kernel side (``kernel.py``), read by the server's host policy; light.

The record is ``{"pid", "connection_file", "served_at"}`` in ``gpugroups-host.json`` of the Jupyter
runtime dir, which a server and its kernels share. The last ``gg.serve()`` wins.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .protocol import HOST_RECORD


def host_record_path() -> Path:
    """Where ``serve()`` records the host kernel: the Jupyter runtime dir (shared with the server)."""
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / HOST_RECORD


def read_host_record(path: Path | None = None) -> dict[str, Any] | None:
    """The host record (``{"pid", "connection_file", "served_at"}``), or None if absent or unreadable."""
    try:
        record = json.loads((path or host_record_path()).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_host_record(path: Path, connection_file: str) -> None:
    """Record this process as the host kernel, atomically (a server never reads half a record);
    ``OSError`` if the runtime dir cannot be written."""
    record = {"pid": os.getpid(), "connection_file": connection_file, "served_at": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def remove_host_record(path: Path) -> None:
    """Withdraw the record if it is still this process's (a later host's record stays)."""
    record = read_host_record(path)
    if record and record.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
