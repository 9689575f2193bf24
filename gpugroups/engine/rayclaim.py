"""One manager per Ray namespace: the claim a manager holds on its namespace while it drives it.

Two managers driving the same device actors would each unload what the other loaded, place groups
by a residency the other keeps changing, and serve what they think is loaded. So the first thing
``ray_devices`` does in a namespace is to take its claim: a small named actor (``OWNER``) that only
says who holds it, on the manager's own node. Unlike the device actors it is not detached, so Ray
ends it with the process that made it: a kernel that dies or restarts frees its namespace by
itself, and its successor adopts the device actors. A manager that closes, or whose constructor
fails, ends it at once (``devices.release``). A manager that finds the name taken waits up to ``CLAIM_WAIT_S`` for it to go
(a kernel just restarted may still be leaving the cluster), then is refused with ``conflict``
naming the holder, before it has touched a device actor.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import weakref
from typing import Any

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import GpuGroupsError

#: The claim's actor name in each namespace.
OWNER = "gpugroups-manager"
#: How long a manager waits for another's claim to go before it is refused.
CLAIM_WAIT_S = 15.0
#: The claims of this process's live managers, by namespace: a second one here is refused without waiting.
_HELD: weakref.WeakValueDictionary[str, Claim] = weakref.WeakValueDictionary()
_HELD_LOCK = threading.Lock()


class Owner:
    """The claim's actor: it holds who made it (process, host, since when), and nothing else."""

    def __init__(self, who: dict[str, Any]) -> None:
        self._who = who

    def who(self) -> dict[str, Any]:
        return self._who


class Claim:
    """A manager's hold on its namespace, shared by its Ray devices (``Device.claim``); ``drop``
    ends it (dropped unended, Ray ends its actor once no handle to it is left)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._actor: Any = _take(self)

    def drop(self) -> None:
        """End the claim now: the namespace is free for the next manager."""
        with _HELD_LOCK:
            actor, self._actor = self._actor, None
            if actor is not None:
                _HELD.pop(self.namespace, None)
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass  # this process left the cluster: the claim ended with its job


@functools.cache
def _owner_class() -> Any:
    return ray.remote(num_cpus=0)(Owner)


def _take(claim: Claim) -> Any:
    """The actor of ``claim`` on its namespace; ``conflict`` if another manager keeps the namespace.
    (A claim dropped unreleased, its manager never made, leaves ``_HELD`` with it, and Ray ends
    its actor once no handle to it is left.)"""
    namespace = claim.namespace
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    made = _owner_class()
    # on this process's node, so that losing another node never ends the claim
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        with _HELD_LOCK:
            if namespace not in _HELD:
                try:
                    actor = made.options(name=OWNER, namespace=namespace, scheduling_strategy=here).remote(me)
                except ValueError:
                    pass  # the name is taken
                else:
                    _HELD[namespace] = claim
                    return actor
        holder = _holder(namespace)
        if namespace in _HELD or time.monotonic() > deadline:  # this process's own will not go by waiting
            raise _taken(namespace, holder or {})
        time.sleep(0.2)  # a claim that is going: its kernel is leaving, or a manager just closed


def _taken(namespace: str, holder: dict[str, Any]) -> GpuGroupsError:
    who = f" (process {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})" if holder else ""
    return GpuGroupsError(
        "conflict",
        f"another manager drives the Ray namespace {namespace!r}{who}: close it (m.close()) or restart its "
        "kernel, or give this manager another ray_namespace",
        {"ray_namespace": namespace, "holder": holder},
    )


def _holder(namespace: str) -> dict[str, Any] | None:
    """Who holds the namespace's claim; None when nobody does (any more)."""
    try:
        return dict(ray.get(ray.get_actor(OWNER, namespace=namespace).who.remote(), timeout=10))
    except (ValueError, RayError):  # no such actor, or it is dying with its process
        return None
