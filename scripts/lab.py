"""Command one's JupyterLab: the quickstart opened directly, nothing to dismiss, settings kept in the project.

``scripts/start.sh`` runs this file; the browser test starts JupyterLab with the same ``lab_command``,
so what it checks (the open tab, no pop-up) is what a user gets.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "quickstart.ipynb"
#: JupyterLab's own settings for this project: no "Jupyter news?" question, no update check.
OVERRIDES: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def lab_command(root: Path, state: Path, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """The ``jupyter lab`` command line serving ``root`` and opening its quickstart notebook.

    JupyterLab's settings and workspaces live under ``state`` (the project's, not the user's
    ``~/.jupyter``); this writes ``state/app-settings/overrides.json`` from ``OVERRIDES`` plus
    ``overrides`` (per plugin). The URL JupyterLab prints, and ``/``, open the notebook as the only
    tab, since ``default_url`` names it.
    """
    settings = state / "app-settings"
    settings.mkdir(parents=True, exist_ok=True)
    merged = {plugin: dict(values) for plugin, values in OVERRIDES.items()}
    for plugin, values in (overrides or {}).items():
        merged.setdefault(plugin, {}).update(values)
    (settings / "overrides.json").write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return [
        str(Path(sys.executable).with_name("jupyter-lab")),
        f"--ServerApp.root_dir={root}",
        f"--LabApp.default_url=/lab/tree/{NOTEBOOK}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--LabApp.app_settings_dir={settings}",
        f"--LabApp.user_settings_dir={state / 'user-settings'}",
        f"--LabApp.workspaces_dir={state / 'workspaces'}",
    ]


def main(args: list[str]) -> None:
    """Replace this process with JupyterLab on ``notebooks/``, state under ``.venv/jupyterlab``; ``args`` go to it."""
    argv = lab_command(REPO / "notebooks", REPO / ".venv" / "jupyterlab") + args
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
