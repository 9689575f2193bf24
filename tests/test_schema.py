"""The shapes of ``schema`` and the schemas derived from them: real manager results conform, an
undeclared field fails, and the converter covers what the shapes use."""

# No ``from __future__ import annotations``: the TypedDicts below are read as the schema module's are.
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, TypedDict

import pytest

import gpugroups as gg
from gpugroups import schema
from gpugroups.errors import HTTP_STATUS
from gpugroups.server.openapi import build_spec
from gpugroups.typeschema import json_schema
from tests.contract import check, errors

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return build_spec("/")


@pytest.fixture(scope="module")
def m(tiny_catalog_toml: Path) -> Any:
    manager = gg.Manager(devices="virtual:2x512MiB", catalog=tiny_catalog_toml)
    yield manager
    manager.close()


def test_error_codes_are_the_errors_modules(spec: dict[str, Any]) -> None:
    assert set(typing.get_args(schema.ErrorCode)) == set(HTTP_STATUS)


def test_real_results_conform_to_the_schemas(m: Any, spec: dict[str, Any]) -> None:
    check(spec, "State", m.state())
    check(spec, "LoadResult", m.load("tiny-a", device_id=0))
    check(spec, "LoadResult", m.load("tiny-b"))  # a member switch: switched
    check(spec, "LoadResult", m.load_group("gpt", device_id=1))
    plain = m.process("tiny-a", "hello world", num_predictions=200)
    check(spec, "ProcessResult", plain)
    assert plain["notes"] and "text" not in plain["predictions"][0]
    continued = m.process("tiny-b", "hello", max_new_tokens=3)
    check(spec, "ProcessResult", continued)
    assert all("text" in p for p in continued["predictions"])
    pinned = m.pin("gpt")
    check(spec, "PinResult", pinned)
    assert pinned["pinned"] is True and pinned["device_id"] == 1
    check(spec, "State", m.state())  # pinned, two groups resident
    check(spec, "PinResult", m.unpin("gpt"))
    check(spec, "ModelList", m.models())
    check(spec, "GroupList", m.groups())
    check(spec, "UnloadResult", m.unload("tiny-a"))
    check(spec, "UnloadResult", m.unload("tiny-a"))  # not_loaded
    cleared = m.clear_device(1)
    check(spec, "ClearResult", cleared)
    assert cleared["unloaded"] == ["gpt"]


def test_events_conform_to_the_schemas(m: Any, spec: dict[str, Any]) -> None:
    seen: list[dict[str, Any]] = []
    unsubscribe = m.subscribe(seen.append)
    try:
        m.load("tiny-a")
        m.unload("tiny-a")
    finally:
        unsubscribe()
    kinds = {e["type"] for e in seen}
    assert kinds == {"state_update", "load_progress"}, kinds
    for event in seen:
        check(spec, "StateUpdateEvent" if event["type"] == "state_update" else "LoadProgressEvent", event)


def test_an_undeclared_field_fails(m: Any, spec: dict[str, Any]) -> None:
    state = m.state()
    assert errors(spec, "State", state) == []
    state["devices"][0]["temperature_c"] = 41
    assert any("temperature_c" in e for e in errors(spec, "State", state))
    del state["devices"][0]["temperature_c"]
    state["surprise"] = True
    assert any("surprise" in e for e in errors(spec, "State", state))


def test_a_missing_or_mistyped_field_fails(m: Any, spec: dict[str, Any]) -> None:
    state = m.state()
    del state["groups"][0]["current_model"]
    assert any("current_model" in e for e in errors(spec, "State", state))
    state = m.state()
    state["devices"][0]["memory"]["manager_bytes"] = "12"
    assert any("manager_bytes" in e for e in errors(spec, "State", state))


class Inner(TypedDict):
    """An inner shape."""

    n: int


class Outer(TypedDict):
    a: Annotated[str, "An a."]
    b: NotRequired[list[Inner]]
    c: Literal["x", "y"] | None
    d: dict[str, float]
    e: int | None
    f: Any


def test_the_converter() -> None:
    s = json_schema(Outer)
    assert s["additionalProperties"] is False and s["required"] == ["a", "c", "d", "e", "f"]
    props = s["properties"]
    assert props["a"] == {"type": "string", "description": "An a."}
    inner = props["b"]["items"]
    assert inner["properties"] == {"n": {"type": "integer"}} and inner["description"] == "An inner shape."
    assert props["c"] == {"type": ["string", "null"], "enum": ["x", "y", None]}
    assert props["d"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert props["e"] == {"type": ["integer", "null"]}
    assert props["f"] == {}
    with pytest.raises(TypeError):
        json_schema(dict[int, str])
    with pytest.raises(TypeError):
        json_schema(set[str])


def test_every_component_is_derived_from_a_shape(spec: dict[str, Any]) -> None:
    from gpugroups.typeschema import components

    assert spec["components"]["schemas"] == components(schema.COMPONENTS)
    assert "is_switching" not in spec["components"]["schemas"]["Device"]["properties"]
    memory = spec["components"]["schemas"]["Memory"]["properties"]
    assert {"manager_bytes", "other_bytes"} <= set(memory)
