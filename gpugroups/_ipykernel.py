"""Every place gpugroups leans on ipykernel's private behaviour, in one room, for both sides of the
bridge and the panel. Light: nothing here imports ipykernel (the server process imports it too).

Checked against ipykernel 7.4.0 (with comm 0.2.3 and jupyter_client 8.10). When ipykernel
changes, this is the file to re-read; each workaround says what it avoids:

1. **Comm routing follows the last sender** (ipykernel >= 7 with subshells). An incoming
   ``comm_msg`` is dispatched to the subshell of the comm's last *outgoing* message
   (``BaseComm._reply_subshell_for``), not to the subshell named in its header. A ``Comm.send``
   from a background thread while a notebook cell runs re-routes the comm to the busy main shell,
   and requests then wait for the cell. ``route_by_header`` replaces that hook so a message goes
   where its sender addressed it (the bridge comm and the panel's widget comm).
2. **Pushes parented to the running cell.** ``Comm.send`` from a background thread takes the
   kernel's current parent, the notebook's ``execute_request``, so frontends file the push under
   that cell. ``publish_comm_msg`` sends on IOPub with a fixed parent (the ``comm_open``) instead.
3. **IPython's pre/post-execute events on the subshell.** ``comm``'s ``BaseComm.handle_msg``
   triggers ``pre_execute``/``post_execute`` around every message, on the subshell thread, in the
   middle of the user's cell. ``take_comm_messages`` hands messages to our handler directly.
4. **Shared socket identity** (server side). ipykernel's shell and control sockets set
   ``ROUTER_HANDOVER``; a client made with the kernel manager's own ``Session`` shares its
   identity with every other such client, and the last one to connect takes the replies.
   ``client_with_own_identity`` gives the bridge a session id of its own.
5. **Stale subshells** (server side). After a kernel restart a message for the old subshell is
   answered on shell with an error reply named ``UNKNOWN_SUBSHELL_ERROR``: the host is gone.
6. **Subshells before the kernel has started** (server side). ipykernel 7 answers on control
   while its main thread is still starting (user startup files, extensions); a
   ``create_subshell_request`` in that gap fails inside the kernel and gets no reply, or an error
   reply. Seen about once in 230 attaches on a loaded machine. ``server/connection.py`` asks
   again (``SUBSHELL_CREATE_RETRY`` seconds, doubling, at most ``SUBSHELL_CREATE_ERRORS`` error
   replies) and deletes a subshell whose reply came in late.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

#: ``ename`` of ipykernel's error reply to a message for a subshell it does not know (workaround 5).
UNKNOWN_SUBSHELL_ERROR = "UnknownSubshellError"
#: Seconds to wait for a ``create_subshell_reply`` before asking again, doubling up to 8x (workaround 6).
SUBSHELL_CREATE_RETRY = 0.5
#: Error replies to ``create_subshell_request`` tolerated while the kernel starts (workaround 6).
SUBSHELL_CREATE_ERRORS = 5


def reply_subshell_from_header(_data: Any, header_subshell_id: str | None) -> str | None:
    """ipykernel's ``_reply_subshell_for`` hook: a message goes to the subshell its header names."""
    return header_subshell_id


def route_by_header(comm: Any) -> None:
    """Dispatch ``comm``'s incoming messages by their own header, not its last sender (workaround 1)."""
    comm._reply_subshell_for = reply_subshell_from_header


def take_comm_messages(comm: Any, handler: Callable[[dict[str, Any]], None]) -> None:
    """Give ``comm``'s incoming messages to ``handler`` without IPython's pre/post-execute events
    (workaround 3)."""
    comm.handle_msg = handler


def publish_comm_msg(kernel: Any, comm: Any, data: dict[str, Any], parent: dict[str, Any]) -> None:
    """Send ``data`` on ``comm`` straight to IOPub with ``parent`` as the parent (workarounds 1 and 2).
    Safe from any thread: ipykernel's IOPub socket is thread-safe."""
    kernel.session.send(
        kernel.iopub_socket,
        "comm_msg",
        {"comm_id": comm.comm_id, "data": data},
        parent=parent,
        ident=comm.topic,
    )


def client_with_own_identity(kernel: Any) -> Any:
    """A client of a server-managed ``kernel`` with a session id, hence a socket identity, of its
    own (workaround 4)."""
    session = kernel.session.clone()
    session.session = uuid.uuid4().hex
    return kernel.client(session=session)
