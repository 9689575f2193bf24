"""Run ``jupyter server`` for the tests, dumping ``sys.modules`` and the collector's thresholds to
``$GPUGROUPS_TEST_MODULES_FILE`` on SIGUSR2, so a test can ask the real server process what it has
imported and how its garbage collector is set."""

import gc
import json
import os
import signal
import sys


def _dump(*_: object) -> None:
    path = os.environ["GPUGROUPS_TEST_MODULES_FILE"]
    with open(path + ".part", "w") as f:
        json.dump({"modules": sorted(sys.modules), "gc_threshold": gc.get_threshold()}, f)
    os.replace(path + ".part", path)  # the test polls for the file: it must never see half of it


signal.signal(signal.SIGUSR2, _dump)

from jupyter_server.serverapp import main  # noqa: E402

sys.exit(main(argv=[*sys.argv[1:], "--ServerApp.jpserver_extensions={'gpugroups': True}"]))
