"""One exception family with stable codes, shared by the manager, the bridge, REST and the client.

A code says what went wrong in a way a program can branch on; ``HTTP_STATUS`` maps each code to
the status the REST API answers with, so the mapping lives in one place.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from .schema import ErrorInfo

#: Stable error codes and the HTTP status each is answered with.
HTTP_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "invalid_catalog": 400,
    "invalid_model": 400,
    "unknown_model": 404,
    "unknown_group": 404,
    "unknown_device": 404,
    "unknown_kernel": 404,
    "forbidden": 403,
    "method_not_allowed": 405,
    "not_found": 404,
    "conflict": 409,
    "load_failed": 500,
    "host_unavailable": 503,
    "timeout": 504,
    "insufficient_memory": 507,
    "internal_error": 500,
    #: The request was cancelled because its caller went away (nginx's "client closed request"):
    #: REST answers it only to a caller that is no longer there.
    "cancelled": 499,
}


class GpuGroupsError(Exception):
    """An error with a stable ``code`` (see ``HTTP_STATUS``) and a human ``message``.

    ``details`` carries machine-readable context (the estimate and each device's room for
    ``insufficient_memory``, the cause for ``load_failed``) and travels through REST and the
    bridge unchanged.
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def http_status(self) -> int:
        """The HTTP status REST answers this error with."""
        return HTTP_STATUS[self.code]

    def to_json(self) -> ErrorInfo:
        """The ``{"code", "message"[, "details"]}`` body used by REST, the bridge and the panel."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return cast("ErrorInfo", body)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> GpuGroupsError:
        """Rebuild an error from ``to_json``'s shape (unknown codes become ``internal_error``)."""
        code = body.get("code", "internal_error")
        if code not in HTTP_STATUS:
            code = "internal_error"
        return cls(code, str(body.get("message", "")), body.get("details") or None)

    def __repr__(self) -> str:
        return f"GpuGroupsError({self.code!r}, {self.message!r})"


def manager_closed() -> GpuGroupsError:
    """What every call that would change a closed manager (or wait on its workers) raises."""
    return GpuGroupsError("invalid_request", "the manager is closed")


class HooksLeftWarning(UserWarning):
    """Research code (``m.run``'s function, a ``m.use`` block) left forward hooks on a served
    model: every later answer of its group goes through them. Shown every time (a second hook
    forgotten is as worth saying as the first); filter it to steer on purpose in silence."""


warnings.filterwarnings("always", category=HooksLeftWarning)
