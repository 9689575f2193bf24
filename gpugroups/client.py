"""``gg.Client``: the Manager's method names over the server extension's REST API, and its events.

``Client("http://localhost:8888", token)`` gets one method per op of the ops table (``state``,
``load``, ``process``, ...) with the Manager's argument names; errors are raised as
``GpuGroupsError`` with the code the server answered. ``events()`` iterates over the WebSocket's
messages. Light: no torch, so it also runs where no model ever will.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from .errors import GpuGroupsError
from .protocol import API_PREFIX, OPS, Op


class Client:
    """A ``Manager`` lookalike that talks to a Jupyter server running the gpugroups extension.

    ``url`` is the server's base URL (with its base path, e.g. ``http://host:8888/user/me/``);
    ``token`` is the Jupyter token (sent as ``Authorization: token ...``). ``timeout`` bounds every
    request in seconds (None: wait as long as the server does).
    """

    def __init__(
        self, url: str = "http://localhost:8888", token: str | None = None, timeout: float | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http = requests.Session()
        if token:
            self._http.headers["Authorization"] = f"token {token}"

    # ---- the non-op routes ----------------------------------------------------------------
    def host(self) -> dict[str, Any]:
        """``{kernel_id, subshells, started_by}`` of the host kernel (all None if none yet)."""
        return self._send("GET", "/system/host")

    def set_host(self, kernel_id: str) -> dict[str, Any]:
        """Make the running kernel ``kernel_id`` the host."""
        return self._send("POST", "/system/host", {"kernel_id": kernel_id})

    def openapi(self) -> dict[str, Any]:
        """The server's OpenAPI document."""
        return self._send("GET", "/openapi.json")

    def events(self, timeout: float | None = None) -> EventStream:
        """The WebSocket's messages: ``system_state`` first, then ``state_update``, ``load_progress``...

        ``timeout``: seconds to wait for each message (``TimeoutError`` after); None waits forever.
        Use as ``with client.events() as ev: for msg in ev: ...``.
        """
        return EventStream(self._ws_url(), self.token, timeout)

    def close(self) -> None:
        """Close the HTTP session."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<gpugroups.Client {self.url}>"

    # ---- wire -----------------------------------------------------------------------------
    def call(self, op_name: str, **kwargs: Any) -> Any:
        """Run the op ``op_name`` with ``kwargs`` (None values are left out, as their defaults)."""
        op = OPS[op_name]
        args = {k: v for k, v in kwargs.items() if v is not None}
        path_args = {p.name: args.pop(p.name) for p in op.params if p.in_path and p.name in args}
        missing = [p.name for p in op.params if p.in_path and p.name not in path_args]
        if missing:
            raise GpuGroupsError("invalid_request", f"{op_name}: '{missing[0]}' is required")
        path = op.path.format(**path_args)
        return self._send(op.http_method, path, args if op.http_method == "POST" else None)

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(
            method,
            self.url + API_PREFIX + path,
            data=None if body is None else json.dumps(body),
            timeout=self.timeout,
        )
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.ok:
            return payload
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            error = {
                "code": "internal_error",
                "message": f"HTTP {response.status_code}: {response.text[:200]}",
            }
        raise GpuGroupsError.from_json(error)

    def _ws_url(self) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + API_PREFIX + "/ws", "", ""))


def _op_method(op: Op) -> Any:
    """A ``Client`` method for ``op``: the Manager's argument names, required ones first."""

    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        bound = method.__signature__.bind(self, *args, **kwargs)  # type: ignore[attr-defined]
        bound.arguments.pop("self")
        return self.call(op.name, **bound.arguments)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for p in sorted(op.params, key=lambda p: not p.required):
        default = inspect.Parameter.empty if p.required else None
        params.append(inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    method.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    method.__name__ = method.__qualname__ = op.manager_method
    args = "".join(f"\n    {p.name}: {p.description}" for p in op.params if p.description)
    method.__doc__ = f"{op.summary} (``{op.http_method} {API_PREFIX}{op.path}``){args}"
    return method


for _op in OPS.values():
    setattr(Client, _op.manager_method, _op_method(_op))


class EventStream:
    """An iterator over the event WebSocket's messages (dicts); ``get_state()`` asks for a fresh state."""

    def __init__(self, url: str, token: str | None, timeout: float | None) -> None:
        import websocket  # websocket-client; imported here so REST-only use never needs it

        header = [f"Authorization: token {token}"] if token else []
        self._ws = websocket.create_connection(url, header=header, timeout=timeout)
        self._timeout_error = websocket.WebSocketTimeoutException
        self._closed_error = websocket.WebSocketConnectionClosedException

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            message = self._ws.recv()
        except self._timeout_error:
            raise TimeoutError("no event within the timeout") from None
        except self._closed_error:
            raise StopIteration from None
        if not message:
            raise StopIteration
        return json.loads(message)

    def get_state(self) -> None:
        """Ask for a ``system_state`` message (it arrives in order with the events)."""
        self._ws.send(json.dumps({"type": "get_state"}))

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
