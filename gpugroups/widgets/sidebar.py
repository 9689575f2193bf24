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


def open_in_sidebar(panel: Panel, title: str = TITLE) -> Any:
    """Show ``panel`` in a new tab of JupyterLab's right side panel; returns the ``Sidecar`` holding it.

    Needs a kernel (there is no side panel in plain Python): ``invalid_request`` otherwise. Front
    ends without the sidecar extension (Notebook 7, VS Code) show no tab; the panel's view in a
    cell then shows the whole panel instead.
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
    return sidecar


def _in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (not plain Python, not a terminal IPython)."""
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None
