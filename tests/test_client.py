"""``gg.Client`` without a server: it checks arguments by the ops table's rules before sending,
turns any error answer into a ``GpuGroupsError``, and type-checks as a user would use it."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gpugroups import Client, GpuGroupsError

ROOT = Path(__file__).resolve().parents[1]


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with a proxy's HTML error page, and counts the requests."""

    requests: ClassVar[list[str]] = []
    status, page = 502, b"<html>bad gateway</html>"

    def do_GET(self) -> None:
        self.requests.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


class LandingPage(Recorder):
    """Answers 200 with an HTML page (a wrong base URL's landing page, a login proxy)."""

    status, page = 200, b"<html>Jupyter Server</html>"


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Any:
    Recorder.requests = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), getattr(request, "param", Recorder))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_an_error_that_is_not_json_is_still_a_gpugroups_error(server: Any) -> None:
    with pytest.raises(GpuGroupsError) as exc:
        Client(f"http://127.0.0.1:{server.server_address[1]}").state()
    assert exc.value.code == "internal_error" and "502" in exc.value.message
    assert Recorder.requests == ["/api/v2/system/state"]


@pytest.mark.parametrize("server", [LandingPage], indirect=True)
def test_a_success_that_is_not_the_apis_json_is_an_error_not_none(server: Any) -> None:
    with pytest.raises(GpuGroupsError) as exc:
        Client(f"http://127.0.0.1:{server.server_address[1]}/not/jupyter").state()
    assert exc.value.code == "internal_error" and "HTTP 200" in exc.value.message and "base URL" in exc.value.message


def test_the_url_jupyter_prints_gives_the_token_and_a_url_without_a_scheme_is_refused() -> None:
    c = Client("http://127.0.0.1:8888/user/me/?token=abc#x")
    assert (c.url, c.token) == ("http://127.0.0.1:8888/user/me", "abc")
    assert Client("http://127.0.0.1:8888/?token=abc", token="given").token == "given"
    for printed in ("http://127.0.0.1:8888/lab?token=abc", "http://127.0.0.1:8888/tree?token=abc"):
        assert (Client(printed).url, Client(printed).token) == ("http://127.0.0.1:8888", "abc")
    copied = Client("https://hub.example/user/me/lab/tree/work/a.ipynb?token=t")  # from the browser
    assert copied.url == "https://hub.example/user/me"
    assert Client("http://h:8888/user/lab-a/").url == "http://h:8888/user/lab-a"  # a base path, kept
    assert Client("http://h/user/lab/?token=t").url == "http://h/user/lab"  # ends in "/": a base as given
    for bad in ("localhost:8888", "127.0.0.1:8888", "ftp://h/", ""):
        with pytest.raises(GpuGroupsError) as exc:
            Client(bad)
        assert exc.value.code == "invalid_request", bad


def test_the_event_socket_says_its_failures_as_gpugroups_errors(server: Any) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GpuGroupsError) as down:
        Client(f"http://127.0.0.1:{port}").events()
    assert down.value.code == "host_unavailable"
    with pytest.raises(GpuGroupsError) as refused:  # a server that is no gpugroups server: 502
        Client(f"http://127.0.0.1:{server.server_address[1]}").events()
    assert refused.value.code == "internal_error" and "502" in refused.value.message


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda c: c.process("m", ""), "'prompt' must not be empty"),
        (lambda c: c.load(""), "'model_id' must not be empty"),
        (lambda c: c.clear_device(-1), "must be >= 0"),
        (lambda c: c.process("m", "x", max_new_tokens=-1), "must be >= 0"),
    ],
)
def test_bad_arguments_never_leave_the_client(server: Any, call: Any, needle: str) -> None:
    with pytest.raises(GpuGroupsError) as exc:
        call(Client(f"http://127.0.0.1:{server.server_address[1]}"))
    assert exc.value.code == "invalid_request" and needle in exc.value.message
    assert Recorder.requests == []


def test_path_params_fill_the_route(server: Any) -> None:
    with pytest.raises(GpuGroupsError):
        Client(f"http://127.0.0.1:{server.server_address[1]}").clear_device(1)
    assert Recorder.requests == ["/api/v2/devices/1/clear"]


def test_mypy_catches_a_wrong_call(tmp_path: Path) -> None:
    """The typed snippet passes mypy (scripts/test.sh checks it); the same with a wrong argument
    type or a misspelt result field does not, so the check can fail."""
    snippet = (ROOT / "tests" / "typing" / "user_snippet.py").read_text()
    wrong = snippet.replace('client.load("tiny-a", device_id=0)', 'client.load("tiny-a", device_id="0")')
    wrong = wrong.replace('loaded["seconds"]', 'loaded["secs"]')
    assert wrong.count('"0"') and "secs" in wrong
    bad = tmp_path / "bad_snippet.py"
    bad.write_text(wrong)
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(bad)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert 'Argument "device_id" to "load" of "Client"' in run.stdout
    assert '"LoadResult" has no key "secs"' in run.stdout


def test_a_proxy_in_the_environment_when_the_client_is_made_is_used(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    client = Client("http://gpugroups.invalid:8888")
    monkeypatch.delenv("http_proxy")  # read once, when the client was made
    with pytest.raises(GpuGroupsError):
        client.state()
    assert Recorder.requests == ["http://gpugroups.invalid:8888/api/v2/system/state"]


def test_a_server_that_cannot_be_reached_is_host_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GpuGroupsError) as exc:
        Client(f"http://127.0.0.1:{port}").state()
    assert exc.value.code == "host_unavailable" and str(port) in exc.value.message


def test_a_server_that_does_not_answer_within_the_timeout_is_a_timeout() -> None:
    with socket.socket() as s:  # accepts connections (the kernel's backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(GpuGroupsError) as exc:
            Client(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=0.3).state()
    assert exc.value.code == "timeout" and "0.3 s" in exc.value.message
