"""The local Ray cluster the Ray tests share: two nodes of two simulated GPUs each, all on 127.0.0.1,
started once per test session (``ray_cluster`` in ``tests/conftest.py``) in this process.

Importing this module sets what Ray reads at its own import, for this process and every process
the tests start (kernels, servers, subprocesses inherit it): loopback only, no auth token.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.waiting import wait_for

# Without it Ray rewrites 127.0.0.1 to the machine's network address in every process that joins
# (see docs/scale-out.md); newer Ray also writes an auth token unless told not to.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

#: The device spec of every Ray test: each GPU resource a 512 MiB virtual device.
SPEC = "ray:virtual:512MiB"
#: Bytes of object store per node; Ray's default takes 30 % of RAM.
STORE = 80 * 1024**2
NODE_ARGS: dict[str, Any] = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "num_gpus": 2, "object_store_memory": STORE}


@dataclass
class RayCluster:
    """The running cluster (``ray.cluster_utils.Cluster``) and its second node; this process is a driver."""

    cluster: Any
    second: Any

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_node(self) -> Any:
        """One more node of two GPUs (a test that removes a node removes one it added)."""
        node = self.cluster.add_node(**NODE_ARGS)
        self.cluster.wait_for_nodes()
        return node


def start() -> Iterator[RayCluster]:
    """Start the cluster, join it, and tear it all down after the ``yield``."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="gg-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp  # nothing under the shared /tmp/ray (its ray_current_cluster file)
    c = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    try:
        second = c.add_node(**NODE_ARGS)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield RayCluster(c, second)
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


def namespace() -> str:
    """A fresh namespace: every manager of the tests gets its own."""
    return f"gg-test-{uuid.uuid4().hex[:8]}"


def actors_in(ns: str) -> list[str]:
    """The names of the live actors in namespace ``ns``."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ns]


def end_namespace(ns: str, timeout: float = 30.0) -> bool:
    """Kill every actor left in ``ns`` (by a process that could not close its manager) and wait
    until none is listed, so the GPUs are free for the next test's manager."""
    import ray

    for name in actors_in(ns):
        try:
            ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
        except ValueError:
            pass  # it exited meanwhile
    return wait_for(lambda: actors_in(ns) == [], timeout, every=0.2)
