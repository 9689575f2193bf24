"""The external fuzzer in the suite: schemathesis (every check, every phase) against a real
``jupyter server`` process and its host kernel, driven by the OpenAPI document the server serves.
It must find no failure: no 5xx, every status and body as documented, valid data accepted,
invalid data refused, unauthenticated requests refused.

Bounded for a 2-core machine (about two minutes): ``/api/v2`` only (``/api/v1`` runs the same
handlers), a few examples per operation and phase, one worker, no stateful phase's long chains.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from gpugroups.protocol import API_PREFIX

from .conftest import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: Examples per operation in the fuzzing phase: enough to reach every check, few enough for the suite.
EXAMPLES = 15


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_catalog_toml: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("fuzz"), tiny_catalog_toml, ["--GpuGroupsHost.host_kernel=auto"])
    server.client().load("tiny-gpt2")  # a host with a resident group: requests reach the manager
    yield server
    server.stop()


def run_fuzzer(live: LiveServer) -> tuple[list[str], int]:
    """Every failure schemathesis found (one line each), and how many scenarios it ran."""
    config = SchemathesisConfig.from_dict({
        "headers": live.headers,
        "workers": 1,
        "generation": {"max-examples": EXAMPLES},
        "request-timeout": 60,
    })
    schema = schemathesis.openapi.from_url(
        live.url + API_PREFIX + "/openapi.json", headers=live.headers, config=config
    ).include(path_regex=f"^{API_PREFIX}/")
    failures: list[str] = []
    scenarios = 0
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            scenarios += 1
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        case = event.recorder.cases[case_id].value
                        failures.append(
                            f"{check.name}: {case.method} {case.formatted_path} body={case.body!r}: "
                            f"{check.failure_info.failure.title}: {check.failure_info.failure.message}"
                        )
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"{type(event).__name__}: {getattr(event, 'value', None) or getattr(event, 'exception', None)!r}")
    return failures, scenarios


def test_the_fuzzer_finds_no_failure(fuzzed: LiveServer) -> None:
    failures, scenarios = run_fuzzer(fuzzed)
    assert scenarios > 0
    assert not failures, "\n".join(sorted(set(failures)))
    assert fuzzed.client().process("tiny-gpt2", "x", num_predictions=1)["predictions"]  # the host still serves
