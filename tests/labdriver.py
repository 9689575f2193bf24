"""JupyterLab and Chromium for the browser tests: a real server, a real browser, a person's moves.

``lab`` starts a JupyterLab the way command one does (``scripts.lab.lab_command``) with
``binder/jupyter_server_config.json`` as its config, on a free port, its root a temp copy of
``notebooks/``; ``browser`` is Debian's Chromium under Playwright. The functions below open a
notebook and wait for its kernel (the status bar, not the execution indicator: see
``shared/BROWSER.md``), run cells as a person would and read back what they printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.lab import lab_command

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A JupyterLab on a free port, its root a temp folder holding the notebooks, in its own process group."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    shutil.copytree(REPO / "notebooks", root)
    config, data, runtime = tmp / "config", tmp / "data", tmp / "runtime"
    for d in (config, data, runtime):
        d.mkdir()
    shutil.copy(REPO / "binder" / "jupyter_server_config.json", config / "jupyter_server_config.json")
    # Keep every cell in the DOM so waits and reads never miss a scrolled-away cell.
    windowing = {"@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"}}
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(data),
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "PYTHONUNBUFFERED": "1",
    }
    # Command one's command line (scripts/start.sh runs the same lab_command), on a test port.
    command = lab_command(root, tmp / "lab-state", windowing) + [
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
    ]
    # The server keeps its own handle on the log; ours can close at once.
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"JupyterLab did not start; log:\n{(tmp / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield {"url": url, "token": token, "root": root, "log": tmp / "server.log"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def open_notebook(page: Any, lab: dict[str, Any], name: str) -> None:
    page.goto(f"{lab['url']}/lab/tree/{name}?token={lab['token']}")
    wait_notebook(page)


def open_notebook7(page: Any, lab: dict[str, Any], name: str) -> None:
    """Open ``name`` in Notebook 7 (no kernel status in its status bar: ask the server)."""
    page.goto(f"{lab['url']}/notebooks/{name}?token={lab['token']}")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    wait_kernel_idle(lab, name)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")


def wait_notebook(page: Any) -> None:
    """Until a notebook shows its cells and its kernel is idle (the shown notebook: the workspace
    may have restored others, in hidden tabs)."""
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
    # The execution indicator reads "idle" before any kernel exists; the status bar does not.
    page.wait_for_function(
        """() => [...document.querySelectorAll('#jp-main-statusbar span.jp-StatusBar-TextItem')]
                 .some(e => (e.getAttribute('title') || '').startsWith('Change kernel') && /\\| Idle$/.test(e.textContent.trim()))"""
    )


def wait_kernel_idle(lab: dict[str, Any], name: str) -> None:
    """Until the server reports the notebook's kernel started and idle (for UIs without the status bar)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as r:
            sessions = json.load(r)
        if any(s["path"].endswith(name) and s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no idle kernel for {name}")


def run_all(page: Any) -> None:
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()


def start_cell(page: Any, code: str) -> Any:
    """Append a cell with ``code`` and start it, the way a person would; returns the cell."""
    cells = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell"
    before = page.locator(cells).count()
    page.locator(f"{cells} .jp-InputPrompt").last.click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.keyboard.insert_text(code)
    page.keyboard.press("Control+Enter")
    return page.locator(cells).nth(before)


def cell_json(cell: Any, timeout_s: float = 60) -> Any:
    """The JSON a cell printed as one line ``@@<json>``, once it has."""
    out = cell.locator(".jp-OutputArea-output").filter(has_text="@@").first
    out.wait_for(timeout=timeout_s * 1000)
    return json.loads(out.inner_text().split("@@", 1)[1].strip().splitlines()[0])


def run_cell(page: Any, code: str, timeout_s: float = 60) -> Any:
    """Append a cell with ``code`` (which prints one line ``@@<json>``), run it, return the JSON."""
    return cell_json(start_cell(page, code), timeout_s)


def shot(page: Any, locator: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    locator.scroll_into_view_if_needed()
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


@contextlib.contextmanager
def page_for(browser: Any, name: str) -> Iterator[Any]:
    """A 1280x720 page that leaves ``<name>-failure.png`` behind if the test fails, and closes."""
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.set_default_timeout(60_000)
    try:
        yield page
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"))
        raise
    finally:
        page.close()


def write_notebook(lab: dict[str, Any], name: str, *sources: str) -> None:
    """A notebook ``name`` in the lab's root with one code cell per source (markdown if it starts with ``#``)."""
    import nbformat

    cells = [
        nbformat.v4.new_markdown_cell(s) if s.startswith("#") else nbformat.v4.new_code_cell(s) for s in sources
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, lab["root"] / name)
