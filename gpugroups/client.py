"""``gg.Client``: the Manager's method names over the server extension's REST API, and its events.

``Client("http://localhost:8888", token)`` has one method per op of the ops table (``state``,
``load``, ``process``, ...) with the Manager's signature and typed results (the shapes of
``schema``; a test keeps both in step with the table and the Manager); errors are raised as
``GpuGroupsError`` with the code the server answered. ``events()`` iterates over the WebSocket's
messages. Light: no torch, so it also runs where no model ever will.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit, urlunsplit

import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies

from .errors import GpuGroupsError
from .protocol import API_PREFIX, get_op
from .schema import (
    ClearResult,
    Event,
    GroupList,
    Host,
    LoadResult,
    ModelList,
    PinResult,
    ProcessResult,
    State,
    UnloadResult,
)

#: Seconds to open a connection (a TLS handshake included) before ``host_unavailable``.
CONNECT_S = 10.0
#: Connections kept per server: as many threads may share one client without reconnecting.
POOL_SIZE = 32
#: A page of JupyterLab or Notebook at the end of a URL copied from the terminal or the browser
#: (``/lab``, ``/tree``, ``/lab/tree/x.ipynb``...): the server's base URL is what comes before it.
#: A URL whose path ends in ``/`` is a base URL as given (a hub user named ``lab`` keeps it).
FRONT_END_PAGE = re.compile(r"/(?:lab|tree|notebooks|edit|doc)(?:/.*)?$")


class Client:
    """A ``Manager`` lookalike that talks to a Jupyter server running the gpugroups extension.

    ``url`` is the server's base URL (with its base path, e.g. ``http://host:8888/user/me/``; the
    URL Jupyter prints, ``http://host:8888/lab?token=...``, or one copied from the browser works
    too: the page, ``/lab...`` or ``/tree...``, is dropped unless the path ends in ``/``, and the
    token read from it); ``token`` is the Jupyter token (sent as ``Authorization: token ...``).
    ``timeout`` bounds every request in
    seconds (None: wait as long as the server does); connecting takes at most ``CONNECT_S``.
    Proxies and the CA bundle come from the environment as it is when the client is made
    (``HTTP(S)_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``), as with ``requests``; up to
    ``POOL_SIZE`` threads share one client's connections. A server that cannot be reached raises
    ``host_unavailable``, one that does not answer within ``timeout`` raises ``timeout``, an
    answer that is not the API's JSON (a login page, a proxy's) ``internal_error``.

    It speaks HTTP through urllib3's connection pool directly: ``requests`` on top of it costs
    about 0.6 ms a call, a tenth of a REST ``process`` on loopback.
    """

    def __init__(
        self, url: str = "http://localhost:8888", token: str | None = None, timeout: float | None = None
    ) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise GpuGroupsError("invalid_request", f"url must be http(s)://host[:port][/base/path], got {url!r}")
        base = parts.path if parts.path.endswith("/") else FRONT_END_PAGE.sub("", parts.path)  # "/": a base as given
        self.url = urlunsplit((parts.scheme, parts.netloc, base.rstrip("/"), "", ""))
        token = token or parse_qs(parts.query).get("token", [None])[0]
        self.token = token
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"token {token}"
        self._http = _pool(self.url)

    # ---- the non-op routes ----------------------------------------------------------------
    # ---- the ops (see protocol.OPS for routes and limits) -----------------------------------
    def state(self) -> State:
        """The whole state: devices, groups, models, operations (``GET /system/state``)."""
        return cast(State, self.call("state"))

    def models(self) -> ModelList:
        """The catalog's models with where each is loaded."""
        return cast(ModelList, self.call("models"))

    def groups(self) -> GroupList:
        """The catalog's groups with estimates, pins and residence."""
        return cast(GroupList, self.call("groups"))

    def load(self, model_id: str, device_id: int | None = None, device_ids: list[int] | None = None) -> LoadResult:
        """Make ``model_id`` its group's current member, loading the group first if needed
        (sharded over ``device_ids`` when given)."""
        return cast(LoadResult, self.call("load", model_id=model_id, device_id=device_id, device_ids=device_ids))

    def unload(self, model_id: str, device_id: int | None = None) -> UnloadResult:
        """Unload the group that holds ``model_id``."""
        return cast(UnloadResult, self.call("unload", model_id=model_id, device_id=device_id))

    def load_group(
        self, group_id: str, device_id: int | None = None, device_ids: list[int] | None = None
    ) -> LoadResult:
        """Load a whole group onto a device (placement chooses when ``device_id`` is None), or
        sharded over ``device_ids``."""
        return cast(
            LoadResult, self.call("load_group", group_id=group_id, device_id=device_id, device_ids=device_ids)
        )

    def unload_group(self, group_id: str, device_id: int | None = None) -> UnloadResult:
        """Unload a group (an explicit unload also drops its pin)."""
        return cast(UnloadResult, self.call("unload_group", group_id=group_id, device_id=device_id))

    def pin(
        self, group_id: str, device_id: int | None = None, pinned: bool = True, device_ids: list[int] | None = None
    ) -> PinResult:
        """Keep a group resident (loading it if needed); ``pinned=False`` unpins."""
        return cast(
            PinResult,
            self.call("pin", group_id=group_id, device_id=device_id, pinned=pinned, device_ids=device_ids),
        )

    def unpin(self, group_id: str) -> PinResult:
        """Let a pinned group be evicted again."""
        return cast(PinResult, self.call("unpin", group_id=group_id))

    def process(
        self,
        model_id: str,
        prompt: str,
        num_predictions: int = 3,
        device_id: int | None = None,
        max_new_tokens: int = 0,
    ) -> ProcessResult:
        """Top-N next-token predictions for ``prompt``, most likely first (see ``Manager.process``)."""
        return cast(
            ProcessResult,
            self.call(
                "process", model_id=model_id, prompt=prompt, num_predictions=num_predictions,
                device_id=device_id, max_new_tokens=max_new_tokens,
            ),
        )

    def clear_device(self, device_id: int) -> ClearResult:
        """Unload every unpinned group on a device."""
        return cast(ClearResult, self.call("clear_device", device_id=device_id))

    # ---- the non-op routes ----------------------------------------------------------------
    def host(self) -> Host:
        """``{kernel_id, subshells, started_by}`` of the host kernel (all None if none yet)."""
        return cast(Host, self._send("GET", "/system/host"))

    def set_host(self, kernel_id: str) -> Host:
        """Make the running kernel ``kernel_id`` the host."""
        return cast(Host, self._send("POST", "/system/host", {"kernel_id": kernel_id}))

    def openapi(self) -> dict[str, Any]:
        """The server's OpenAPI document."""
        return cast(dict[str, Any], self._send("GET", "/openapi.json"))

    def events(self, timeout: float | None = None) -> EventStream:
        """The WebSocket's messages: ``system_state`` first, then ``state_update``, ``load_progress``...

        ``timeout``: seconds to wait for each message (``TimeoutError`` after); None waits forever.
        Use as ``with client.events() as ev: for msg in ev: ...``.
        """
        return EventStream(self._ws_url(), self.token, timeout)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<gpugroups.Client {self.url}>"

    # ---- wire -----------------------------------------------------------------------------
    def call(self, op_name: str, **kwargs: Any) -> Any:
        """Run the op ``op_name`` with ``kwargs``, checked here by the ops table's rules first (None
        means a param's default)."""
        op = get_op(op_name)
        args = op.validate(kwargs)
        path_args = {p.name: args.pop(p.name) for p in op.params if p.in_path}
        path = op.path.format(**path_args)
        return self._send(op.http_method, path, args if op.http_method == "POST" else None)

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.url + API_PREFIX + path
        try:
            response = self._http.request(
                method,
                url,
                body=None if body is None else json.dumps(body),
                headers=self._headers,
                timeout=urllib3.Timeout(total=self.timeout, connect=CONNECT_S),
                retries=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            # a refused connection is a ConnectTimeoutError too (NewConnectionError)
            if isinstance(exc, urllib3.exceptions.TimeoutError) and not isinstance(
                exc, urllib3.exceptions.ConnectTimeoutError
            ):
                raise GpuGroupsError("timeout", f"{method} {url}: no answer within {self.timeout} s") from None
            raise GpuGroupsError("host_unavailable", f"cannot reach the Jupyter server at {self.url}: {exc}") from None
        try:
            payload = json.loads(response.data)
        except ValueError:
            payload = None
        if response.status < 400 and payload is not None:
            return payload
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            text = response.data[:200].decode("utf-8", "replace")
            error = {
                "code": "internal_error",
                "message": f"HTTP {response.status} from {url}, not the API's JSON (is {self.url} the Jupyter "
                f"server's base URL?): {text}",
            }
        raise GpuGroupsError.from_json(error)

    def _ws_url(self) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + API_PREFIX + "/ws", "", ""))


def _pool(url: str) -> urllib3.PoolManager:
    """Connections to ``url``'s server: through the environment's proxy for it, if any, checking
    TLS certificates against the environment's CA bundle (else certifi's, as ``requests`` does)."""
    ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or DEFAULT_CA_BUNDLE_PATH
    proxies = get_environ_proxies(url)
    proxy = proxies.get(urlsplit(url).scheme) or proxies.get("all")
    if proxy:
        return urllib3.ProxyManager(proxy, maxsize=POOL_SIZE, ca_certs=ca)
    return urllib3.PoolManager(maxsize=POOL_SIZE, ca_certs=ca)


class EventStream:
    """An iterator over the event WebSocket's messages (``schema.Event``); ``get_state()`` asks for a fresh state."""

    def __init__(self, url: str, token: str | None, timeout: float | None) -> None:
        import websocket  # websocket-client; imported here so REST-only use never needs it

        header = [f"Authorization: token {token}"] if token else []
        try:
            self._ws = websocket.create_connection(url, header=header, timeout=timeout)
        except websocket.WebSocketBadStatusException as exc:  # refused: as the REST routes say it
            body = getattr(exc, "resp_body", None) or b""
            try:
                error = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                code = {403: "forbidden", 404: "not_found"}.get(exc.status_code, "internal_error")
                error = {"code": code, "message": f"the event socket at {url} was refused: HTTP {exc.status_code}"}
            raise GpuGroupsError.from_json(error) from None
        except (OSError, websocket.WebSocketException) as exc:
            raise GpuGroupsError("host_unavailable", f"cannot open the event socket at {url}: {exc}") from None
        self._timeout_error = websocket.WebSocketTimeoutException
        self._closed_error = websocket.WebSocketConnectionClosedException
        self._closing = False

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            message = self._ws.recv()
        except self._timeout_error:
            raise TimeoutError("no event within the timeout") from None
        except (self._closed_error, OSError):
            message = ""
        if message:
            return cast(Event, json.loads(message))
        if self._closing:
            raise StopIteration
        raise GpuGroupsError(  # not an end: the server went away
            "host_unavailable", "the event socket closed (the server stopped or restarted): open client.events() "
            "again, which starts with the whole state (system_state)",
        )

    def get_state(self) -> None:
        """Ask for a ``system_state`` message (it arrives in order with the events)."""
        self._ws.send(json.dumps({"type": "get_state"}))

    def close(self) -> None:
        self._closing = True
        self._ws.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
