"""Validate a JSON value against a component schema of an OpenAPI document (the served one)."""

from __future__ import annotations

import copy
from typing import Any

from jsonschema import Draft202012Validator

#: Device fields the engine restructure removes (``is_switching`` was always false). Until it
#: lands, the values under test are checked without them; delete this once core.py is gone.
REMOVED_DEVICE_FIELDS = ("is_switching",)


def without_removed(value: Any) -> Any:
    """``value`` (a state, or anything holding one) less ``REMOVED_DEVICE_FIELDS``."""
    value = copy.deepcopy(value)
    states = [value] if isinstance(value, dict) and "devices" in value else []
    if isinstance(value, dict) and isinstance(value.get("state"), dict):
        states.append(value["state"])
    for state in states:
        for device in state.get("devices", []):
            for name in REMOVED_DEVICE_FIELDS:
                device.pop(name, None)
    return value


def errors(spec: dict[str, Any], name: str, value: Any) -> list[str]:
    """Every way ``value`` breaks the schema ``name`` of ``spec`` (empty: it conforms)."""
    root = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    validator = Draft202012Validator(root)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]


def check(spec: dict[str, Any], name: str, value: Any) -> None:
    """Assert that ``value`` conforms to the schema ``name`` (after ``without_removed``)."""
    problems = errors(spec, name, without_removed(value))
    assert not problems, f"{name}: " + "; ".join(problems[:10])
