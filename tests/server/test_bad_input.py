"""Bad input against a real server and host kernel: every case answers a 4xx JSON error, and the
same host kernel keeps serving afterwards (nothing is lost, nothing dies)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket

from gpugroups.protocol import API_PREFIX, MAX_DEVICE_ID
from gpugroups.server.websocket import MAX_CLIENT_MESSAGE

from .conftest import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DEEP = "[" * 100_000


@pytest.fixture(scope="module")
def host_id(live: LiveServer) -> Iterator[str]:
    """The host kernel, attached before the first case and the same after the last."""
    assert live.get(API_PREFIX + "/system/state").status_code == 200
    kernel_id = live.get(API_PREFIX + "/system/host").json()["kernel_id"]
    yield kernel_id
    assert live.get(API_PREFIX + "/system/state").status_code == 200
    assert live.get(API_PREFIX + "/system/host").json()["kernel_id"] == kernel_id


def refused(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def raw_post(live: LiveServer, path: str, data: str) -> requests.Response:
    headers = {**live.headers, "Content-Type": "application/json"}
    return requests.post(live.url + API_PREFIX + path, data=data.encode(), headers=headers, timeout=60)


def test_deeply_nested_bodies_are_refused(live: LiveServer, host_id: str) -> None:
    for body in (DEEP, '{"model_id": ' + DEEP):
        error = refused(raw_post(live, "/models/load", body), 400, "invalid_request")
        assert "nested too deeply" in error["message"] or "not valid JSON" in error["message"]


def test_deeply_nested_websocket_frames_are_refused_and_the_socket_lives(live: LiveServer, host_id: str) -> None:
    ws = websocket.create_connection(
        live.url.replace("http", "ws") + API_PREFIX + "/ws", header=[f"Authorization: token {live.token}"], timeout=30
    )
    try:
        assert json.loads(ws.recv())["type"] == "system_state"
        ws.send(DEEP[:MAX_CLIENT_MESSAGE])  # too deep for Python's parser, within the size limit
        while (answer := json.loads(ws.recv()))["type"] != "error":  # events may come first
            assert answer["type"] in ("system_state", "state_update"), answer
        assert answer["error"]["code"] == "invalid_request"
        ws.send(json.dumps({"type": "get_state"}))
        while (message := json.loads(ws.recv()))["type"] != "system_state":
            pass
        assert message["state"]["version"] >= 0
    finally:
        ws.close()


def test_a_large_body_is_refused_from_its_headers_not_read(live: LiveServer) -> None:
    """A body over ``max_body_bytes`` is refused before it is read: a client that announces 300 MiB
    and has sent 64 KiB gets its 400 at once (one with no token its 403), not after 300 MiB."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(live.url)
    for auth, status in ((f"Authorization: token {live.token}\r\n", 400), ("", 403)):
        with socket.create_connection((where.hostname, where.port), timeout=10) as s:
            s.sendall(
                f"POST {API_PREFIX}/models/load HTTP/1.1\r\nHost: {where.netloc}\r\n{auth}"
                f"Content-Type: application/json\r\nContent-Length: {300 << 20}\r\n\r\n".encode()
                + b"x" * (64 << 10)
            )
            reply = s.recv(65536).decode(errors="replace")
        assert reply.startswith(f"HTTP/1.1 {status}"), reply[:200]
        if status == 400:
            assert "GpuGroupsHost.max_body_bytes" in reply


def test_an_oversize_websocket_message_closes_that_socket_only(live: LiveServer, host_id: str) -> None:
    """A message over ``MAX_CLIENT_MESSAGE`` is never buffered or parsed: its socket is closed
    (1009, message too big); another socket and REST are served as before."""
    url, auth = live.url.replace("http", "ws") + API_PREFIX + "/ws", [f"Authorization: token {live.token}"]
    big, other = (websocket.create_connection(url, header=auth, timeout=30) for _ in range(2))
    try:
        assert json.loads(big.recv())["type"] == "system_state"
        assert json.loads(other.recv())["type"] == "system_state"
        closed: int | str = "open"
        try:  # the server closes it (1009) as soon as it sees the size, before the rest arrives
            big.send(json.dumps({"type": "get_state", "pad": "x" * (1 << 20)}))
            while closed == "open":
                opcode, data = big.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    closed = int.from_bytes(data[:2], "big")
        except (ConnectionResetError, BrokenPipeError, websocket.WebSocketConnectionClosedException):
            closed = "reset"  # closed while the client still wrote: the close frame was lost
        assert closed in (1009, "reset")
        other.send(json.dumps({"type": "get_state"}))
        while json.loads(other.recv())["type"] != "system_state":
            pass
        assert live.get(API_PREFIX + "/system/state").ok
    finally:
        big.close()
        other.close()


@pytest.mark.parametrize("text", ["\ud800", "a\udc80b"])
def test_unpaired_surrogates_are_refused_at_the_edge(live: LiveServer, host_id: str, text: str) -> None:
    for path, body in (
        ("/models/process", {"model_id": "tiny-a", "prompt": text}),
        ("/models/load", {"model_id": text}),
        ("/groups/unpin", {"group_id": "single:" + text}),
    ):
        error = refused(live.post(API_PREFIX + path, body), 400, "invalid_request")
        assert "surrogate" in error["message"]


@pytest.mark.parametrize(
    "model_id", ["~nosuchuser", "~nosuchuser/x", "./" + "x" * 300, "/" + "y" * 256 + "/z", "./a/" + "b" * 4000]
)
def test_ids_the_kernel_cannot_look_up_are_unknown_models(live: LiveServer, host_id: str, model_id: str) -> None:
    refused(live.post(API_PREFIX + "/models/load", {"model_id": model_id}), 404, "unknown_model")
    refused(live.post(API_PREFIX + "/models/unload", {"model_id": model_id}), 404, "unknown_model")
    refused(live.post(API_PREFIX + "/groups/unpin", {"group_id": "single:" + model_id}), 404, "unknown_model")


@pytest.mark.parametrize("part", ["%C2%B2", "%D9%A1", "-1", "1e0", "0x1", "99999999999999999999999"])
def test_only_ascii_digits_are_device_ids(live: LiveServer, host_id: str, part: str) -> None:
    r = live.post(API_PREFIX + f"/devices/{part}/clear")
    assert r.status_code in (400, 404), (part, r.status_code, r.text[:300])
    assert r.json()["error"]["code"] in ("invalid_request", "unknown_device")


def test_device_ids_above_the_documented_limit_are_refused_and_below_it_unknown(live: LiveServer, host_id: str) -> None:
    """Every device index the OpenAPI document allows is read as a number (a fuzzer's 20-digit id
    used to be refused as "not an integer"); above the limit the answer names it."""
    limit = live.get(API_PREFIX + "/openapi.json").json()["paths"][API_PREFIX + "/devices/{device_id}/clear"]
    assert limit["post"]["parameters"][0]["schema"]["maximum"] == MAX_DEVICE_ID
    refused(live.post(API_PREFIX + f"/devices/{MAX_DEVICE_ID}/clear"), 404, "unknown_device")
    over = refused(live.post(API_PREFIX + f"/devices/{MAX_DEVICE_ID + 1}/clear"), 400, "invalid_request")
    assert str(MAX_DEVICE_ID) in over["message"]
    for body in ({"device_id": MAX_DEVICE_ID + 1}, {"device_ids": [0, MAX_DEVICE_ID + 1]}):
        over = refused(live.post(API_PREFIX + "/groups/load", {"group_id": "tiny", **body}), 400, "invalid_request")
        assert str(MAX_DEVICE_ID) in over["message"]


def test_unload_of_an_unloaded_folder_creates_no_group(live: LiveServer, host_id: str, tiny_gpt2: Any) -> None:
    before = live.get(API_PREFIX + "/groups").json()
    for spelling in (f"{tiny_gpt2}/./.", f"{tiny_gpt2}/", f"{tiny_gpt2}//."):
        assert live.post(API_PREFIX + "/models/unload", {"model_id": spelling}).json()["status"] == "not_loaded"
    assert live.get(API_PREFIX + "/groups").json() == before
