"""The external fuzzer in the suite: schemathesis (every check, every phase) against a real
``jupyter server`` process and its host kernel, driven by the OpenAPI document the server serves.
It must find no failure: no 5xx, every status and body as documented, valid data accepted,
invalid data refused, unauthenticated requests refused.

Bounded for a 2-core machine (about two minutes): ``/api/v2`` only (``/api/v1`` runs the same
handlers), a few examples per operation and phase, one worker, and a host whose manager has a small
work budget (``max_request_work``), so no generated request holds the device for long. ``/ws`` is
left out: an HTTP fuzzer cannot speak WebSocket (``test_websocket.py`` covers its refusals).

Two answers differ from what schemathesis expects, on purpose, and the test accepts exactly them:
a request without its ``Authorization`` header gets Jupyter's 403 (as every Jupyter API answers it,
and as documented) where schemathesis expects 401; and a ``process`` request that the schema allows
may be refused with 400 for its work (``protocol.WORK_RULE``), which depends on the prompt's tokens
and the host's budget, so no schema can state it (the OpenAPI description does).
"""

from __future__ import annotations

import json
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

#: Examples per operation and phase: enough to reach every check, few enough for the suite.
EXAMPLES = 20
#: The host's manager: two small virtual devices, the tiny catalog, a small work budget.
HOST = """
import gpugroups as gg
m = gg.Manager(devices="virtual:2x512MiB", catalog={catalog!r}, max_request_work=64, progress=False)
gg.serve(m)
m.load("tiny-gpt2")
"""
#: Jupyter's answer to a request without credentials, where schemathesis expects 401.
JUPYTER_403 = "missing_required_header: Got 403 when missing required 'Authorization' header, expected 401"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_catalog_toml: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("fuzz"), tiny_catalog_toml, ["--GpuGroupsHost.host_kernel=none"])
    kernel = server.kernel(server.start_kernel())
    kernel.run(HOST.format(catalog=str(tiny_catalog_toml)))
    kernel.close()
    yield server
    server.stop()


def over_budget(recorder: Any, case_id: str) -> bool:
    """Whether the answer to this case was the work budget's refusal."""
    interaction = recorder.interactions.get(case_id)
    if interaction is None or interaction.response is None or interaction.response.status_code != 400:
        return False
    error = json.loads(interaction.response.content)["error"]
    return error["code"] == "invalid_request" and "max_request_work" in error["message"]


def run_fuzzer(live: LiveServer) -> tuple[list[str], int, int]:
    """Every failure schemathesis found (one line each) but Jupyter's 403 for a missing token, how
    many scenarios it ran, and how many times it met that 403."""
    config = SchemathesisConfig.from_dict({
        "headers": live.headers,
        "workers": 1,
        "generation": {"max-examples": EXAMPLES},
        "request-timeout": 60,
    })
    schema = schemathesis.openapi.from_url(
        live.url + API_PREFIX + "/openapi.json", headers=live.headers, config=config
    ).include(path_regex=f"^{API_PREFIX}/").exclude(path=f"{API_PREFIX}/ws")
    failures: list[str] = []
    scenarios = jupyter_403 = 0
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            scenarios += 1
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        case = event.recorder.cases[case_id].value
                        failure = check.failure_info.failure
                        if f"{check.name}: {failure.message}" == JUPYTER_403:
                            jupyter_403 += 1
                            continue
                        if check.name == "positive_data_acceptance" and over_budget(event.recorder, case_id):
                            continue
                        failures.append(
                            f"{check.name}: {case.method} {case.formatted_path} body={case.body!r}: "
                            f"{failure.title}: {failure.message}"
                        )
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"{type(event).__name__}: {getattr(event, 'value', None) or getattr(event, 'exception', None)!r}")
    return failures, scenarios, jupyter_403


def test_the_fuzzer_finds_no_failure(fuzzed: LiveServer) -> None:
    failures, scenarios, jupyter_403 = run_fuzzer(fuzzed)
    assert scenarios > 0 and jupyter_403 > 0  # it did try every route without a token
    assert not failures, "\n".join(sorted(set(failures)))
    assert fuzzed.client().process("tiny-gpt2", "x", num_predictions=1)["predictions"]  # the host still serves
