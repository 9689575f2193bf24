"""The modules the Jupyter server process imports never pull in torch, transformers or peft."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft")

LIGHT = [
    "gpugroups", "gpugroups.errors", "gpugroups.protocol", "gpugroups.schema", "gpugroups.typeschema",
    "gpugroups.client", "gpugroups.catalog", "gpugroups.catalog_toml", "gpugroups.localfiles", "gpugroups.placement",
    "gpugroups.events", "gpugroups.hostrecord",
    "gpugroups.kernelenv",
    "gpugroups.kernel", "gpugroups._ipykernel",
    # the engine package itself and the worker seam stay light too (an out-of-process worker imports them)
    "gpugroups.engine", "gpugroups.engine.calls", "gpugroups.engine.worker", "gpugroups.engine.remote",
    "gpugroups.engine.procworker",
    "gpugroups.engine.prochost",
]

# Runs in a fresh interpreter: this test process has long imported torch itself. Besides
# importing, it does what the server does with them: find the extension point, build a
# catalog with the default roots, and import every module of the server package.
PROBE = """
import importlib, json, pkgutil, sys
modules = json.loads(sys.argv[1])
for name in modules:
    importlib.import_module(name)
import gpugroups
assert {"Manager", "Client"} <= set(dir(gpugroups))  # offered to tab completion, still not imported
from gpugroups.catalog import Catalog
Catalog().to_json()
if importlib.util.find_spec("gpugroups.server") is not None:
    import gpugroups.server
    for info in pkgutil.walk_packages(gpugroups.server.__path__, "gpugroups.server."):
        importlib.import_module(info.name)
        modules.append(info.name)
    gpugroups._jupyter_server_extension_points()
print(json.dumps({"imported": modules, "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def test_light_modules_import_no_torch_transformers_or_peft():
    modules = list(LIGHT)
    if importlib.util.find_spec("gpugroups.server") is not None:
        modules.append("gpugroups.server")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(modules), json.dumps(HEAVY)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(modules) <= set(result["imported"])
    assert result["heavy"] == [], f"{result['heavy']} imported by {result['imported']}"


def test_the_probe_notices_a_heavy_import():
    """The same probe on a module that does import torch must say so (the check can fail)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(["gpugroups.engine.inference"]), json.dumps(HEAVY)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    assert "torch" in json.loads(out.stdout.strip().splitlines()[-1])["heavy"]
