"""The first import of transformers survives another thread importing it at the same moment.

transformers' package swaps itself for a lazy module as its import ends, and a thread that
imports from it meanwhile fails with "partially initialized module". A host kernel's first
concurrent requests did that (a load's logging set-up imported transformers beside another
request's guarded import), and the failure was kept for the kernel's life: no load ever
worked again. Each trial is a fresh interpreter, where the import really is the first.
"""

from __future__ import annotations

import subprocess
import sys

TRIAL = r"""
import threading
from gpugroups.engine import torchkit
torchkit.import_once("torch")
out = {}
def guarded():
    try:
        torchkit.import_transformers(); out["guarded"] = "ok"
    except ImportError as exc:
        out["guarded"] = repr(exc)
def unguarded():  # what user code, or a stray import of ours, does
    try:
        from transformers.utils import logging  # noqa: F401
        out["unguarded"] = "ok"
    except ImportError as exc:
        out["unguarded"] = repr(exc)
threads = [threading.Thread(target=guarded), threading.Thread(target=unguarded)]
for t in threads: t.start()
for t in threads: t.join()
torchkit.import_transformers()
from transformers import AutoModelForCausalLM  # noqa: F401
print(out["guarded"])
"""


def test_import_once_gets_transformers_even_beside_another_threads_import():
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", TRIAL], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "ok", done.stdout
