"""A kernel's default manager takes its devices from the environment, which the server sets for
the host kernel it starts from its ``GpuGroupsHost`` settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpugroups.kernelenv import DEVICES_ENV, RAY_ADDRESS_ENV, RAY_NAMESPACE_ENV, manager_options
from gpugroups.server.host import GpuGroupsHost

REPO = Path(__file__).resolve().parents[1]


def test_manager_options_from_the_environment() -> None:
    assert manager_options({}) == {}
    assert manager_options({DEVICES_ENV: " ", RAY_NAMESPACE_ENV: ""}) == {}
    assert manager_options({DEVICES_ENV: "ray:virtual:512MiB"}) == {"devices": "ray:virtual:512MiB"}
    assert manager_options({DEVICES_ENV: "cuda:0, ray", RAY_NAMESPACE_ENV: "lab-a"}) == {
        "devices": ["cuda:0", "ray"], "ray_namespace": "lab-a",
    }  # fmt: skip


def test_the_host_kernel_gets_the_settings_of_its_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (DEVICES_ENV, RAY_ADDRESS_ENV, RAY_NAMESPACE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert not {DEVICES_ENV, RAY_ADDRESS_ENV, RAY_NAMESPACE_ENV} & set(GpuGroupsHost()._kernel_env())
    env = GpuGroupsHost(devices=["cuda:0", "ray"], ray_address="10.0.0.1:6379", ray_namespace="lab-a")._kernel_env()
    assert manager_options(env) == {"devices": ["cuda:0", "ray"], "ray_namespace": "lab-a"}
    assert env[RAY_ADDRESS_ENV] == "10.0.0.1:6379"


@pytest.mark.slow
def test_the_default_manager_uses_the_devices_of_the_environment() -> None:
    code = "import json, gpugroups as gg; print(json.dumps([d['device'] for d in gg.manager(catalog=[]).state()['devices']]))"
    env = {**os.environ, DEVICES_ENV: "virtual:2x512MiB,cpu", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["virtual:0", "virtual:1", "cpu"]
