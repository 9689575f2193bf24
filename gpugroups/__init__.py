"""gpugroups: run several Hugging Face models on one or more GPUs from Jupyter.

Start with ``gg.manager()`` (this kernel's ``gg.Manager``: load, switch, process, pin, run),
``gg.panel()`` (the live widget), ``gg.serve()`` (the ``/api/v2`` routes) or ``gg.Client`` (those
routes from elsewhere); ``help(gg.Manager)`` documents the whole Python API.

The public face. Heavy parts (torch, transformers) load lazily on first use of ``manager()``,
``Manager``, ``panel()`` or ``serve()``, so ``import gpugroups`` and the light modules
(``catalog``, ``placement``, ``protocol``) stay cheap enough for the Jupyter server process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import GpuGroupsError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .client import Client
    from .engine.manager import Manager

__all__ = ["Client", "GpuGroupsError", "Manager", "manager", "panel", "serve", "__version__"]

_LAZY = {"Manager": ".engine.manager", "Client": ".client"}


def manager(**kwargs: Any) -> Manager:
    """This kernel's manager, created on first call (``kwargs`` go to ``Manager`` then)."""
    from .engine.default import default_manager

    return default_manager(**kwargs)


def panel(m: Manager | None = None, *, sidebar: bool = False) -> Any:
    """The live widget for ``m`` (default: this kernel's manager).

    ``sidebar=True`` also opens it in JupyterLab's right side panel, where it stays in view while
    the notebook scrolls; shown in a cell too, it is then a one-line pointer there.
    """
    from .widgets import Panel

    return Panel(m or manager(), sidebar=sidebar)


def serve(m: Manager | None = None) -> Any:
    """Make this kernel the host behind the server extension's ``/api/v2`` routes."""
    from .kernel import serve as _serve

    return _serve(m or manager())


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .server.app import GpuGroupsApp

    return [{"module": "gpugroups.server", "app": GpuGroupsApp}]


def __dir__() -> list[str]:
    """The lazy names too, so that ``dir(gg)`` and tab completion offer ``Manager`` and ``Client``."""
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'gpugroups' has no attribute {name!r}")
