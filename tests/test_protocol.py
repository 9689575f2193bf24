"""The ops table: one set of validation rules for every edge, and no place that misses an op."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import gpugroups as gg
from gpugroups import schema
from gpugroups.errors import GpuGroupsError
from gpugroups.protocol import CAP_RULE, MAX_ID_CHARS, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, OPS, ops_json
from gpugroups.server.openapi import build_spec


def refused(op: str, args: Any) -> str:
    with pytest.raises(GpuGroupsError) as exc:
        OPS[op].validate(args)
    assert exc.value.code == "invalid_request"
    return exc.value.message


@pytest.mark.parametrize(
    ("op", "args", "needle"),
    [
        ("process", {"model_id": "m", "prompt": ""}, "'prompt' must not be empty"),
        ("process", {"model_id": "m", "prompt": "x" * (MAX_PROMPT_CHARS + 1)}, f"at most {MAX_PROMPT_CHARS}"),
        ("process", {"model_id": "m", "prompt": "x", "num_predictions": 0}, "'num_predictions' must be >= 1"),
        ("process", {"model_id": "m", "prompt": "x", "num_predictions": 2.5}, "must be an integer, got float"),
        ("process", {"model_id": "m", "prompt": "x", "max_new_tokens": -1}, "must be >= 0"),
        ("process", {"model_id": "m", "prompt": None}, "'prompt' is required"),
        ("load", {"model_id": ""}, "'model_id' must not be empty"),
        ("load", {"model_id": "m" * (MAX_ID_CHARS + 1)}, f"at most {MAX_ID_CHARS}"),
        ("load", {"model_id": "m", "device_id": -1}, "must be >= 0"),
        ("load", {"model_id": "m", "device_id": True}, "must be an integer, got bool"),
        ("load_group", {"group_id": ""}, "'group_id' must not be empty"),
        ("pin", {"group_id": "g", "pinned": 1}, "must be a boolean"),
        ("state", {"x": 1}, "unknown field(s) 'x'"),
        ("load", [1], "JSON object"),
    ],
)
def test_bad_arguments_are_refused(op: str, args: Any, needle: str) -> None:
    assert needle in refused(op, args)


def test_both_counts_follow_one_rule_capped_not_refused() -> None:
    """num_predictions and max_new_tokens: above the limit is lowered with a note, never refused."""
    process = OPS["process"]
    counts = [p for p in process.params if p.name in ("num_predictions", "max_new_tokens")]
    assert all(p.cap is not None and p.maximum is None for p in counts)
    kwargs = process.validate({"model_id": "m", "prompt": "x", "num_predictions": 10**6, "max_new_tokens": 10**6})
    notes = process.apply_caps(kwargs)
    assert kwargs["max_new_tokens"] == MAX_NEW_TOKENS and len(notes) == 2


def test_integral_numbers_are_integers_and_null_means_the_default() -> None:
    kwargs = OPS["process"].validate(
        {"model_id": "m", "prompt": "x", "num_predictions": 3.0, "device_id": None, "max_new_tokens": None}
    )
    assert kwargs == {"model_id": "m", "prompt": "x", "num_predictions": 3, "max_new_tokens": 0}
    assert type(kwargs["num_predictions"]) is int
    assert OPS["clear_device"].validate({"device_id": 1.0}) == {"device_id": 1}
    # null and missing both mean the ops table's default, which the manager's methods then get
    assert OPS["process"].validate({"model_id": "m", "prompt": "x", "num_predictions": None})["num_predictions"] == 3
    assert OPS["pin"].validate({"group_id": "g"}) == {"group_id": "g", "pinned": True}


def test_the_spec_states_the_same_rules(tmp_path: Any) -> None:
    """Every limit of the table is in the OpenAPI document; optional params may be null there too."""
    spec = build_spec("/")
    for op in OPS.values():
        operation = spec["paths"]["/api/v2" + op.path][op.http_method.lower()]
        body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
        documented = {**body.get("properties", {}), **{p["name"]: p["schema"] for p in operation.get("parameters", [])}}
        assert set(documented) == {p.name for p in op.params}, op.name
        for p in op.params:
            s = documented[p.name]
            json_type = "array" if p.type == "integer_list" else p.type
            assert s["type"] == (json_type if p.required else [json_type, "null"])
            if p.type == "integer_list":  # the range is each item's, the lengths the list's
                limits = (("minItems", p.min_length), ("maxItems", p.max_length))
                assert s["items"].get("minimum") == p.minimum and s["uniqueItems"] is True
            else:
                limits = (("minimum", p.minimum), ("maximum", p.maximum),
                          ("minLength", p.min_length), ("maxLength", p.max_length))
            for key, value in limits:
                assert s.get(key) == value, (op.name, p.name, key)
            if p.default is not None:
                assert s["default"] == p.default
            if p.cap is not None:  # the one rule for a count above its limit, stated where clients read
                assert CAP_RULE.format(name=p.name, cap=p.cap) in s["description"], (op.name, p.name)
        assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{op.result}"
        }


def test_no_place_misses_an_op() -> None:
    spec = build_spec("/")
    for op in OPS.values():
        assert callable(getattr(gg.Manager, op.manager_method, None)), op.name
        assert callable(getattr(gg.Client, op.manager_method, None)), op.name
        assert op.result in schema.COMPONENTS, op.name
        assert op.http_method.lower() in spec["paths"]["/api/v2" + op.path], op.name
        if op.slow:
            assert inspect.iscoroutinefunction(getattr(gg.Manager, "a" + op.manager_method, None)), op.name
        else:  # a cheap read: a GET that neither loads nor changes what is resident
            assert op.http_method == "GET" and not op.may_load and not op.changes_residency, op.name
    assert ops_json().keys() == OPS.keys()


@pytest.mark.parametrize("op", list(OPS.values()), ids=list(OPS))
def test_client_manager_and_table_agree_on_signatures(op: Any) -> None:
    """Same parameter names, order and defaults in the Manager, the Client and the ops table.
    Keyword-only parameters are for callers in the kernel (``process(request_id=...)``), not wire
    parameters."""

    def params(cls: type) -> list[tuple[str, Any]]:
        signature = inspect.signature(getattr(cls, op.manager_method))
        return [
            (p.name, p.default) for p in signature.parameters.values()
            if p.name != "self" and p.kind != inspect.Parameter.KEYWORD_ONLY
        ]

    table = [(p.name, inspect.Parameter.empty if p.required else p.default) for p in op.params]
    assert params(gg.Manager) == params(gg.Client) == table


def test_the_flags_say_what_the_old_lists_said() -> None:
    assert {n for n, op in OPS.items() if op.may_load} == {"load", "load_group", "pin", "process"}
    assert {n for n, op in OPS.items() if not op.slow} == {"state", "models", "groups"}
    assert {n for n, op in OPS.items() if op.changes_residency} == {
        "load", "unload", "load_group", "unload_group", "pin", "unpin", "clear_device"
    }


def test_the_panel_reads_limits_and_flags_from_the_table() -> None:
    """The panel's front end holds no op list or limit of its own; the Panel syncs them from the table."""
    from gpugroups.widgets import panel

    js = "\n".join(part.read_text() for part in sorted(panel.FRONT_DIR.glob("*.js")))
    for own in ("MUTATING", f'"{MAX_NEW_TOKENS}"', str(MAX_PROMPT_CHARS), '"100"'):
        assert own not in js, own
    assert "changes_residency" in js and 'get("spec")' in js
    assert panel.Panel.class_traits()["spec"].metadata.get("sync") is True


def test_device_ids_is_a_list_of_distinct_non_negative_integers() -> None:
    load = OPS["load"]
    assert load.validate({"model_id": "m", "device_ids": [1.0, 0]})["device_ids"] == [1, 0]
    for bad in ([], [0, 0], [-1], ["0"], 0, [True]):
        with pytest.raises(GpuGroupsError) as e:
            load.validate({"model_id": "m", "device_ids": bad})
        assert e.value.code == "invalid_request" and "device_ids" in e.value.message, bad


def test_lanes_keep_cheap_ops_out_of_the_forward_pass_lane():
    lanes = {name: op.lane for name, op in OPS.items()}
    assert {n for n, lane in lanes.items() if lane == "device"} == {"process"}
    assert {n for n, lane in lanes.items() if lane == "inline"} == {"state", "models", "groups"}
    assert lanes["unpin"] == lanes["load"] == lanes["unload"] == "control"


def test_unpaired_surrogates_and_deep_json_are_invalid_requests():
    from gpugroups.protocol import parse_json

    for text in ("\ud800", "x\udc80"):
        with pytest.raises(GpuGroupsError) as err:
            OPS["load"].validate({"model_id": text})
        assert err.value.code == "invalid_request" and "surrogate" in err.value.message
    with pytest.raises(GpuGroupsError) as err:
        parse_json("[" * 100_000)
    assert err.value.code == "invalid_request" and "nested too deeply" in err.value.message
