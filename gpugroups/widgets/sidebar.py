"""A panel in JupyterLab's right side panel (``gg.panel(sidebar=True)``), in view while the notebook scrolls.

The side panel comes from the ``sidecar`` package (JupyterLab's own ``jupyterlab-sidecar``
extension, shipped prebuilt): a ``Sidecar`` output widget anchored ``"right"`` opens a tab there
as soon as it exists, and the panel is its output. The panel's ``sidebar_view`` trait marks its
view there, so that a view of the same panel in a cell can stand aside (see ``front/placement.js``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import GpuGroupsError

if TYPE_CHECKING:
    from .panel import Panel

#: The side-panel tab's title.
TITLE = "gpugroups"
#: The panel that each manager (by ``id``) shows in the side panel: a new one replaces it, so a
#: cell run twice leaves one tab, not two.
_SHOWN: dict[int, Panel] = {}


def open_in_sidebar(panel: Panel, title: str = TITLE) -> Any:
    """Show ``panel`` in a new tab of JupyterLab's right side panel; returns the ``Sidecar`` holding it.

    Needs a kernel (there is no side panel in plain Python): ``invalid_request`` otherwise. Front
    ends without the sidecar extension (Notebook 7, VS Code) show no tab; the panel's view in a
    cell then shows the whole panel instead. The same manager's earlier side panel is closed.
    """
    if not _in_kernel():
        raise GpuGroupsError(
            "invalid_request",
            "gg.panel(sidebar=True) needs a notebook kernel (the side panel is JupyterLab's); "
            "outside one there is nowhere to show a panel",
        )
    from sidecar import Sidecar

    panel.sidebar_view = panel.model_id
    sidecar = Sidecar(title=title, anchor="right")
    # Set as the Sidecar's output in the kernel, not captured from a display by the front end.
    sidecar.append_display_data(panel)
    earlier = _SHOWN.get(id(panel.manager))
    if earlier is not None:
        earlier.close()  # its tab goes with it
    _SHOWN[id(panel.manager)] = panel
    return sidecar


def closed(panel: Panel) -> None:
    """``panel`` closed: it no longer holds its manager's side panel."""
    if _SHOWN.get(id(panel.manager)) is panel:
        del _SHOWN[id(panel.manager)]


def _in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (not plain Python, not a terminal IPython)."""
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None
