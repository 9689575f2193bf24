"""Fixtures for the server extension tests: pytest-jupyter's in-process server (fixtures scoped
to this folder by importing them here) and one real ``jupyter server`` process shared by a module.

Kernels are real ipykernel processes started by the server; they run the repo's venv python
(the kernel spec's ``python`` becomes ``sys.executable``) and find the tiny test models through
``$GPUGROUPS_CATALOG``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

# pytest-jupyter's fixtures and hooks, imported into this conftest so that they (its autouse
# loop and server cleanup included) apply to this folder only. Its hooks also run the unmarked
# ``async def`` tests here on the server's loop, which pytest-asyncio's strict mode leaves alone.
from pytest_jupyter.jupyter_server import *  # noqa: F403

import gpugroups as gg

HERE = Path(__file__).resolve().parent
#: Modules the server process must never import.
HEAVY = ("torch", "transformers", "peft", "accelerate", "safetensors")


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    """The extension on, no host kernel unless a test asks (so no kernel starts by accident)."""
    return {
        "ServerApp": {"jpserver_extensions": {"gpugroups": True}},
        "GpuGroupsHost": {"host_kernel": "none"},
    }


@pytest.fixture
def spec() -> dict[str, Any]:
    """The OpenAPI document as the server builds it (paths below a base URL of ``/``)."""
    from gpugroups.server.openapi import build_spec

    return build_spec("/")


@pytest.fixture
def tiny_env(monkeypatch: pytest.MonkeyPatch, tiny_catalog_toml: Path) -> Path:
    """Kernels started from now on add the tiny test catalog to their default manager."""
    monkeypatch.setenv("GPUGROUPS_CATALOG", str(tiny_catalog_toml))
    return tiny_catalog_toml


class LiveServer:
    """A ``jupyter server`` process with the extension, its token, and ways to reach its kernels."""

    def __init__(self, root: Path, catalog: Path, extra_args: list[str]) -> None:
        self.root = root
        self.token = "gpugroups-test-token"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime_dir = root / "runtime"
        self.modules_file = root / "server-modules.json"
        self.log_path = root / "server.log"
        env = {
            **os.environ,
            "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
            "JUPYTER_CONFIG_DIR": str(root / "config"),
            "JUPYTER_DATA_DIR": str(root / "data"),
            "GPUGROUPS_CATALOG": str(catalog),
            "GPUGROUPS_TEST_MODULES_FILE": str(self.modules_file),
        }
        notebooks = root / "notebooks"
        notebooks.mkdir()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "serve_for_tests.py"),
                f"--port={self.port}",
                "--port-retries=0",
                "--ip=127.0.0.1",
                "--allow-root",
                "--no-browser",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={notebooks}",
                *extra_args,
            ],
            env=env,
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.headers = {"Authorization": f"token {self.token}"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/api/status", headers=self.headers, timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"jupyter server did not start:\n{self.log_path.read_text()[-3000:]}")

    def client(self, **kwargs: Any) -> gg.Client:
        return gg.Client(self.url, self.token, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=60, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, headers=self.headers, json=body, timeout=120, **kwargs)

    def start_kernel(self) -> str:
        return self.post("/api/kernels", {}).json()["id"]

    def kernel_ids(self) -> list[str]:
        return [k["id"] for k in self.get("/api/kernels").json()]

    def kernel(self, kernel_id: str) -> Kernel:
        return Kernel(self.runtime_dir / f"kernel-{kernel_id}.json")

    def modules(self) -> list[str]:
        """The modules the server process has imported so far."""
        return list(self._dump()["modules"])

    def gc_threshold(self) -> tuple[int, int, int]:
        """The server process's garbage collector thresholds (``gc.get_threshold()``)."""
        young, middle, full = self._dump()["gc_threshold"]
        return young, middle, full

    def _dump(self) -> dict[str, Any]:
        """What the server process dumps on SIGUSR2 (``serve_for_tests.py``)."""
        self.modules_file.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not self.modules_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return dict(json.loads(self.modules_file.read_text()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Kernel:
    """A blocking client to one of the server's kernels, for running cells as a notebook would."""

    def __init__(self, connection_file: Path) -> None:
        from jupyter_client import BlockingKernelClient

        self.kc = BlockingKernelClient(connection_file=str(connection_file))
        self.kc.load_connection_file()
        # No heartbeat: a client made from a connection file calls a kernel "dead" when its first
        # heartbeat goes unanswered for a second, which a kernel still starting on a loaded machine is
        self.kc.start_channels(hb=False)
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 120) -> Any:
        """Run ``code`` as a cell; return the JSON value of the variable ``out`` if it sets one."""
        reply = self.kc.execute_interactive(
            code,
            user_expressions={"out": "__import__('json').dumps(globals().get('out'))"},
            timeout=timeout,
            output_hook=lambda msg: None,
        )
        content = reply["content"]
        assert content["status"] == "ok", f"{content.get('ename')}: {content.get('evalue')}"
        return json.loads(content["user_expressions"]["out"]["data"]["text/plain"].strip("'"))

    def start(self, code: str) -> str:
        """Start a cell without waiting for it."""
        return self.kc.execute(code)

    def close(self) -> None:
        self.kc.stop_channels()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test that used the live server shows the tail of that server's log (at debug
    level), so a failure on a CI machine says what the server and bridge were doing."""
    report = yield
    server = getattr(item, "funcargs", {}).get("live")
    if report.failed and isinstance(server, LiveServer):
        report.sections.append(("live jupyter server log", server.log_path.read_text()[-20000:]))
    return report


@pytest.fixture(scope="module")
def live(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_catalog_toml: Path
) -> Iterator[LiveServer]:
    """One real server (host_kernel auto) for a whole test module: its host kernel is shared. A
    module's ``LIVE_ARGS`` (a list of command-line options) are added to the server's."""
    server = LiveServer(
        tmp_path_factory.mktemp("live"),
        tiny_catalog_toml,
        [
            "--GpuGroupsHost.host_kernel=auto",
            "--ServerApp.log_level=DEBUG",
            "--GpuGroupsApp.log_level=DEBUG",
            *getattr(request.module, "LIVE_ARGS", []),
        ],
    )
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slow_start_kernel(jp_data_dir: Path) -> str:
    """The ``gpugroups-slow-start`` kernel spec (``slowkernel.SlowStartKernel``) for this server."""
    spec = jp_data_dir / "kernels" / "gpugroups-slow-start"
    spec.mkdir(parents=True)
    repo = Path(__file__).resolve().parents[2]
    argv = [
        sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
        "--IPKernelApp.kernel_class=tests.server.slowkernel.SlowStartKernel",
    ]  # fmt: skip
    kernel = {"argv": argv, "display_name": "slow start", "language": "python", "env": {"PYTHONPATH": str(repo)}}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return spec.name
