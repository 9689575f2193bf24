"""The environment variables that configure a kernel's default manager (``gg.manager()``), so a
kernel nobody typed into, such as the host kernel the server extension starts, gets its devices.

The server sets them for that kernel from ``c.GpuGroupsHost.*``; anyone can set them for any
kernel. Options given to ``gg.manager(...)`` itself win. Light (no torch, no Ray).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .localfiles import ROOTS_ENV

#: Device specs of the default manager, comma-separated (``virtual:2x512MiB``, ``cuda:0,ray``).
DEVICES_ENV = "GPUGROUPS_DEVICES"
#: The Ray cluster a manager with Ray devices joins (``ray.init(address=...)``), else ``auto``.
RAY_ADDRESS_ENV = "GPUGROUPS_RAY_ADDRESS"
#: The Ray namespace of the default manager's device actors (its ``ray_namespace``).
RAY_NAMESPACE_ENV = "GPUGROUPS_RAY_NAMESPACE"


def manager_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``Manager`` keyword arguments the environment asks for (none when nothing is set)."""
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    specs = [s.strip() for s in env.get(DEVICES_ENV, "").split(",") if s.strip()]
    if specs:
        options["devices"] = specs[0] if len(specs) == 1 else specs
    if env.get(RAY_NAMESPACE_ENV, "").strip():
        options["ray_namespace"] = env[RAY_NAMESPACE_ENV].strip()
    return options


def kernel_env(
    devices: list[str], ray_address: str, ray_namespace: str, model_roots: Sequence[str] = ()
) -> dict[str, str]:
    """The variables that give a kernel's default manager these settings (empty ones are left
    out); ``model_roots`` go before the roots this process's own ``$GPUGROUPS_MODEL_ROOTS`` names."""
    env = {DEVICES_ENV: ",".join(devices), RAY_ADDRESS_ENV: ray_address, RAY_NAMESPACE_ENV: ray_namespace}
    if model_roots:
        inherited = os.environ.get(ROOTS_ENV)
        roots = [os.path.abspath(os.path.expanduser(r)) for r in model_roots]
        env[ROOTS_ENV] = os.pathsep.join([*roots, *([inherited] if inherited else [])])
    return {k: v for k, v in env.items() if v}
