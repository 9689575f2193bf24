"""JSON Schema from Python type hints: how the OpenAPI document derives its schemas from ``schema``.

Covers what the schema module uses: str, int, float, bool, None, Any, list, dict[str, X],
Literal, unions, ``Annotated[X, "description"]`` and TypedDicts (closed: ``additionalProperties:
false``, so an undeclared field fails validation). Named shapes become ``$ref``s. Light: no torch.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_LITERAL_TYPES: dict[type, str] = {str: "string", bool: "boolean", int: "integer", type(None): "null"}


def components(named: Mapping[str, Any], ref_prefix: str = "#/components/schemas/") -> dict[str, Any]:
    """The schema of every entry of ``named``; a named TypedDict used inside another is a ``$ref``."""
    refs = {id(t): name for name, t in named.items() if is_typeddict(t)}
    return {name: _schema(t, refs, ref_prefix, top=True) for name, t in named.items()}


def json_schema(tp: Any) -> dict[str, Any]:
    """The self-contained schema of one type (nested TypedDicts inlined)."""
    return _schema(tp, {}, "", top=True)


def _schema(tp: Any, refs: dict[int, str], prefix: str, top: bool = False) -> dict[str, Any]:
    if not top and id(tp) in refs:
        return {"$ref": prefix + refs[id(tp)]}
    origin = get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = get_args(tp)
        schema = _schema(base, refs, prefix)
        text = [m for m in meta if isinstance(m, str)]
        return {**schema, "description": " ".join(text)} if text and "$ref" not in schema else schema
    if tp is Any:
        return {}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if origin is Literal:
        values = list(get_args(tp))
        kinds = sorted({_LITERAL_TYPES[type(v)] for v in values})
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}
    if origin in (Union, types.UnionType):
        return _union([_schema(a, refs, prefix) for a in get_args(tp)])
    if origin is list:
        (item,) = get_args(tp)
        return {"type": "array", "items": _schema(item, refs, prefix)}
    if origin is dict:
        key, value = get_args(tp)
        if key is not str:
            raise TypeError(f"JSON objects have string keys, not {key!r}")
        return {"type": "object", "additionalProperties": _schema(value, refs, prefix)}
    if is_typeddict(tp):
        return _typeddict(tp, refs, prefix)
    raise TypeError(f"no JSON Schema for {tp!r}")


def _typeddict(tp: Any, refs: dict[int, str], prefix: str) -> dict[str, Any]:
    hints = get_type_hints(tp, include_extras=True)
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": [k for k in hints if k in tp.__required_keys__],
        "properties": {k: _schema(_unwrap_required(h), refs, prefix) for k, h in hints.items()},
    }
    if tp.__doc__:
        schema["description"] = " ".join(tp.__doc__.split())
    return schema


def _unwrap_required(hint: Any) -> Any:
    """``NotRequired[X]`` / ``Required[X]`` -> X (required-ness is read from the TypedDict)."""
    if get_origin(hint) in (typing.Required, typing.NotRequired):
        return get_args(hint)[0]
    return hint


def _union(options: list[dict[str, Any]]) -> dict[str, Any]:
    """Plain typed options (no enum, no ref) merge into one ``type`` list; others become ``anyOf``."""
    plain = all(set(o) == {"type"} and isinstance(o["type"], str) for o in options)
    if plain:
        return {"type": [o["type"] for o in options]}
    nullable_enum = [o for o in options if o != {"type": "null"}]
    if len(nullable_enum) == 1 and "enum" in nullable_enum[0] and len(options) == 2:
        only = nullable_enum[0]
        kinds = only["type"] if isinstance(only["type"], list) else [only["type"]]
        return {"type": [*kinds, "null"], "enum": [*only["enum"], None]}
    return {"anyOf": options}
