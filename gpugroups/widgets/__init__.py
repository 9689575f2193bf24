"""The live notebook panel (``gg.panel()``): an anywidget over a ``Manager``."""

from .panel import Panel

__all__ = ["Panel"]
