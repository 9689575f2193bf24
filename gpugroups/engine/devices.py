"""Devices: CUDA GPUs (torch + NVML), the ``cpu`` fallback, and virtual devices with a budget.

A ``Device`` knows its identity, its budget and where its tensors live (``backing``); its
``memory`` report combines what this manager accounts for with what NVML (CUDA) or the OS
(cpu, via psutil) says is taken by others. Virtual devices (``virtual:[Nx]SIZE[@backing]``) simulate a
GPU of SIZE bytes by accounting while their tensors live on the CPU or a named real device.
``ray`` and ``ray:virtual:SIZE`` are the GPUs of a Ray cluster (``rayworker``); a Ray device
carries its ``node``/``host`` and the factory of its worker. Light: torch and NVML are imported
only when a CUDA device is asked for, Ray only when a Ray device is.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import psutil

from ..errors import GpuGroupsError
from ..protocol import MAX_DEVICE_ID
from .torchkit import import_once

#: The most devices one manager has: every one must be nameable by a device id.
MAX_DEVICES = MAX_DEVICE_ID + 1

_UNITS = {
    "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}
_VIRTUAL = re.compile(r"virtual:(?:(\d+)x)?(\d+(?:\.\d+)?)\s*([KMGT]?i?B)(?:@(cpu|cuda(?::\d+)?))?", re.I)
#: Share of physical RAM a ``cpu`` device may fill with models.
CPU_BUDGET_FRACTION = 0.8
_NVML_TTL_S = 0.5


def parse_size(text: str) -> int:
    """``"2GiB"`` -> 2147483648; units B, KiB/MiB/GiB/TiB (1024) and KB/MB/GB/TB (1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", text, re.I)
    if not m:
        raise GpuGroupsError("invalid_request", f"bad size {text!r}: expected e.g. 512MiB, 2GiB, 300000000B")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class Device:
    """One device the manager places groups on."""

    device_id: int
    device: str  # "cuda:0" | "cpu" | "virtual:1"
    kind: str  # "cuda" | "cpu" | "virtual"
    name: str
    total_bytes: int
    budget_bytes: int
    backing: str  # torch device string the tensors live on
    supports_bf16: bool = False
    nvml_handle: Any = field(default=None, repr=False)
    node: str | None = None  # Ray devices: the node's id
    host: str | None = None  # Ray devices: the node's address
    #: Ray devices: makes the worker that reaches this device on its node (else the manager's own)
    remote_worker: Callable[[Device], Any] | None = field(default=None, repr=False)
    #: Ray devices: their manager's hold on the Ray namespace (``rayclaim.Claim``), shared by all of them
    claim: Any = field(default=None, repr=False)
    _nvml_cache: tuple[float, int, int] = field(default=(0.0, 0, 0), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def memory(self, accounted_bytes: int) -> dict[str, int]:
        """Total / used / free / budget bytes, plus this manager's share and others' share.

        ``accounted_bytes`` is what this manager holds or has reserved here. ``free_bytes`` is
        what placement may still use: the budget left, and never more than the hardware has.
        ``other_bytes`` is what the rest of the machine uses. On a GPU that counts against the
        budget, since every process shares the one card. On ``cpu`` it does not: the budget is
        the RAM share models may fill, and what is really available caps it anyway.
        """
        other = 0
        hw_free = self.total_bytes
        room = self.budget_bytes - accounted_bytes
        if self.kind == "cuda" and self.nvml_handle is not None:  # a Ray node's GPU: accounting only
            used, hw_free = self._nvml()
            other = max(0, used - accounted_bytes)
            room -= other
        elif self.kind == "cpu":
            hw_free = _mem_available()
            other = max(0, self.total_bytes - hw_free - accounted_bytes)
        free = max(0, min(room, hw_free))
        return {
            "total_bytes": self.total_bytes,
            "used_bytes": accounted_bytes + other,
            "free_bytes": free,
            "budget_bytes": self.budget_bytes,
            "manager_bytes": accounted_bytes,
            "other_bytes": other,
        }

    def _nvml(self) -> tuple[int, int]:
        """(used, free) from NVML, cached briefly so ``state()`` stays cheap."""
        with self._lock:
            t, used, free = self._nvml_cache
            if time.monotonic() - t > _NVML_TTL_S:
                import pynvml

                info = pynvml.nvmlDeviceGetMemoryInfo(self.nvml_handle)
                used, free = int(info.used), int(info.free)
                self._nvml_cache = (time.monotonic(), used, free)
            return used, free

    def to_json(self) -> dict[str, Any]:
        """Identity fields of the state JSON's device entry."""
        out: dict[str, Any] = {"device_id": self.device_id, "device": self.device, "kind": self.kind, "name": self.name}
        if self.node is not None:
            out.update(node=self.node, host=self.host)
        return out


def detect(spec: str | Sequence[str] = "auto", ray: Mapping[str, Any] | None = None) -> list[Device]:
    """Devices from a spec: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"virtual:..."``,
    ``"ray"``, ``"ray:virtual:SIZE"`` or a list.

    ``"auto"`` means every CUDA device torch sees, or one ``cpu`` device when there is none.
    ``ray`` holds the options of Ray devices (``rayworker.ray_devices``' keyword arguments).
    """
    if not isinstance(spec, (str, list, tuple)):
        raise GpuGroupsError(
            "invalid_request", f"devices: give a spec string or a list of them, not {type(spec).__name__}"
        )
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise GpuGroupsError("invalid_request", "devices: give at least one device spec")
    parts: list[list[Device] | str] = []  # a Ray spec's actors are made once every spec is known good
    for s in specs:
        if not isinstance(s, str):
            raise GpuGroupsError("invalid_request", f"devices: bad spec {s!r}")
        s = s.strip()
        if s == "auto":
            parts.append(_cuda_devices(None) or [_cpu_device()])
        elif s == "cpu":
            parts.append([_cpu_device()])
        elif re.fullmatch(r"cuda(:\d+)?", s):
            found = _cuda_devices(int(s.split(":")[1]) if ":" in s else None)
            if not found:
                raise GpuGroupsError("unknown_device", f"no CUDA device {s!r} on this machine")
            parts.append(found)
        elif s.lower().startswith("virtual:"):
            parts.append(_virtual_devices(s))
        elif re.fullmatch(r"ray(:virtual:.+)?", s, re.I):
            if any(isinstance(p, str) for p in parts):
                raise GpuGroupsError("invalid_request", "devices: one Ray spec at most (it takes every GPU of the cluster)")
            parts.append(s)
        else:
            raise GpuGroupsError(
                "invalid_request",
                f"devices: bad spec {s!r}; expected auto, cpu, cuda[:N], virtual:[Nx]SIZE[@backing], ray or ray:virtual:SIZE",
            )
    _refuse_twice_listed([d for part in parts if not isinstance(part, str) for d in part])
    devices: list[Device] = []
    for part in parts:
        if isinstance(part, str):
            from .rayworker import ray_devices  # Ray is imported only when asked for

            part = ray_devices(part, **(ray or {}))
        devices += part
    if len(devices) > MAX_DEVICES:
        release(devices)
        raise GpuGroupsError(
            "invalid_request", f"devices: {len(devices)} devices; at most {MAX_DEVICES} (ids 0..{MAX_DEVICE_ID})"
        )
    for i, d in enumerate(devices):
        d.device_id = i
        if d.node is not None:
            d.device = f"ray:{i}"
        elif d.kind == "virtual":
            d.device = f"virtual:{i}"
    return devices


def release(devices: list[Device]) -> None:
    """Let go of what the devices hold for their manager beyond themselves: the Ray namespace
    (the manager closes, or its constructor failed)."""
    for claim in {id(d.claim): d.claim for d in devices if d.claim is not None}.values():
        claim.drop()


def _refuse_twice_listed(devices: list[Device]) -> None:
    """A real device listed twice would be two devices that each count all of its memory."""
    real = [d.device for d in devices if d.kind != "virtual"]
    twice = sorted({name for name in real if real.count(name) > 1})
    if twice:
        raise GpuGroupsError(
            "invalid_request",
            f"devices: {', '.join(map(repr, twice))} listed more than once; each would count all of its memory. "
            f"To split one device, use virtual devices backed by it, e.g. 'virtual:2x4GiB@{twice[0]}'",
        )


def _virtual_devices(spec: str) -> list[Device]:
    m = _VIRTUAL.fullmatch(spec.replace(" ", ""))
    if not m:
        raise GpuGroupsError(
            "invalid_request", f"bad virtual device spec {spec!r}; expected e.g. virtual:4x2GiB or virtual:20GiB@cuda:0"
        )
    count = int(m.group(1) or 1)
    size = parse_size(m.group(2) + m.group(3))
    backing = m.group(4) or "cpu"
    if not 1 <= count <= MAX_DEVICES or size < 1:
        raise GpuGroupsError(
            "invalid_request", f"bad virtual device spec {spec!r}: count must be 1..{MAX_DEVICES}, size positive"
        )
    bf16 = False
    if backing.startswith("cuda"):
        real = _cuda_devices(int(backing.split(":")[1]) if ":" in backing else 0)
        if not real:
            raise GpuGroupsError("unknown_device", f"virtual device backing {backing!r} does not exist here")
        backing, bf16 = real[0].backing, real[0].supports_bf16
    return [
        Device(0, "virtual", "virtual", f"virtual {size / 1024**3:.2f} GiB on {backing}", size, size, backing, bf16)
        for _ in range(count)
    ]


def _cpu_device() -> Device:
    total = int(psutil.virtual_memory().total)
    return Device(0, "cpu", "cpu", "cpu", total, int(total * CPU_BUDGET_FRACTION), "cpu")


def _mem_available() -> int:
    """RAM the OS can give without swapping (psutil: MemAvailable on Linux, the like elsewhere)."""
    return int(psutil.virtual_memory().available)


def _cuda_devices(index: int | None) -> list[Device]:
    """CUDA devices through torch, with NVML handles; none when there is no GPU or driver."""
    try:
        import_once("torch")  # where an interrupt cannot cut it short
        import torch

        if not torch.cuda.is_available():
            return []
        count = torch.cuda.device_count()
    except Exception:
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound and friends: no NVML means no CUDA devices
        return []
    out = []
    for i in range(count) if index is None else [index]:
        if i >= count:
            return []
        props = torch.cuda.get_device_properties(i)
        handle = _nvml_handle(pynvml, props, i)
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        out.append(
            Device(0, f"cuda:{i}", "cuda", props.name, total, total, f"cuda:{i}",
                   torch.cuda.is_bf16_supported() if i == torch.cuda.current_device() else props.major >= 8,
                   handle)
        )
    return out


def _nvml_handle(pynvml: Any, props: Any, index: int) -> Any:
    """Match torch's device to NVML's by UUID (CUDA_VISIBLE_DEVICES may renumber), else by index."""
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        try:
            text = str(uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
        except Exception:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)
