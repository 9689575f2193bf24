"""Validate a JSON value against a component schema of an OpenAPI document (the served one)."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator


def errors(spec: dict[str, Any], name: str, value: Any) -> list[str]:
    """Every way ``value`` breaks the schema ``name`` of ``spec`` (empty: it conforms)."""
    root = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    validator = Draft202012Validator(root)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]


def check(spec: dict[str, Any], name: str, value: Any) -> None:
    """Assert that ``value`` conforms to the schema ``name``."""
    problems = errors(spec, name, value)
    assert not problems, f"{name}: " + "; ".join(problems[:10])
