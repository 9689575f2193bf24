"""Run the ```python examples of a Markdown file and check the outputs they show in comments.

A block right after ``<!-- not run: why -->`` is skipped (the comment renders invisibly). The
others run in order in one namespace per file, statement by statement. Comment lines right
after a statement that read as a Python literal are the output that statement shows: every
``'key': value`` pair and list item written there must match the real result (``...`` stands
for anything, ``{...}`` for any value, a trailing ``...`` in a list or dict for more items, and
a float matches at the precision it is written with).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not run:.*-->\s*$")


@dataclass
class Block:
    """One ```python block: where it starts in its file and whether it is marked not runnable."""

    path: Path
    line: int
    code: str
    runnable: bool


def blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        before = [ln for ln in text[: m.start()].splitlines() if ln.strip()]
        runnable = not (before and _NOT_RUN.search(before[-1]))
        out.append(Block(path, text[: m.start()].count("\n") + 2, m.group(1), runnable))
    return out


def shown_output(lines: list[str], after: int) -> tuple[Any, str] | None:
    """The literal shown in the comment lines from index ``after`` on, with its text; None if prose."""
    comment = []
    for line in lines[after:]:
        if not line.lstrip().startswith("#"):
            break
        comment.append(line.lstrip()[1:])
    text = " ".join(c.strip() for c in comment)
    if not text or (text[0] not in "{['\"-0123456789" and not text.startswith(("True", "False", "None"))):
        return None
    pattern = re.sub(r"\{\s*\.\.\.\s*\}", "...", text)  # {...}: any value
    pattern = re.sub(r",\s*\.\.\.\s*\}", "}", pattern)  # a dict's trailing ...: more keys
    try:
        return ast.literal_eval(pattern), text
    except (ValueError, SyntaxError) as exc:
        raise AssertionError(f"shown output is not a literal gpugroups can check: {text!r}") from exc


def mismatch(shown: Any, real: Any, where: str = "") -> str | None:
    """Where ``real`` differs from what ``shown`` says, or None when it matches."""
    if shown is Ellipsis:
        return None
    if isinstance(shown, dict):
        if not isinstance(real, dict):
            return f"{where or 'value'}: expected a dict, got {real!r}"
        for key, value in shown.items():
            if key not in real:
                return f"{where}[{key!r}] missing"
            found = mismatch(value, real[key], f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(shown, list):
        if not isinstance(real, list):
            return f"{where or 'value'}: expected a list, got {real!r}"
        prefix = shown[:-1] if shown and shown[-1] is Ellipsis else shown
        if len(real) < len(prefix) or (prefix is shown and len(real) != len(shown)):
            return f"{where}: {len(real)} items, shown {len(shown)}"
        for i, value in enumerate(prefix):
            found = mismatch(value, real[i], f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(shown, float) and isinstance(real, (int, float)) and not isinstance(real, bool):
        digits = len(repr(shown).partition(".")[2])
        return None if round(real, digits) == shown else f"{where}: {real!r} is not {shown!r} at {digits} digits"
    return None if shown == real and type(shown) is type(real) else f"{where}: {real!r}, shown {shown!r}"


def run_file(path: Path) -> tuple[dict[str, Any], int]:
    """Run a file's runnable blocks in one fresh namespace; returns it and how many outputs were checked.

    Raises ``AssertionError`` naming the file and line of the first shown output that differs.
    """
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    checked = 0
    for block in blocks(path):
        if not block.runnable:
            continue
        lines = block.code.splitlines()
        for stmt in ast.parse(block.code).body:
            where = f"{path.name}:{block.line + stmt.lineno - 1}"
            # top-level ``await`` is allowed, as in a notebook cell
            source = compile(ast.Module([stmt], []) if not isinstance(stmt, ast.Expr) else ast.Expression(stmt.value),
                             where, "exec" if not isinstance(stmt, ast.Expr) else "eval", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            value = eval(source, namespace)
            if inspect.iscoroutine(value):
                value = asyncio.run(value)
            assert stmt.end_lineno is not None
            shown = shown_output(lines, stmt.end_lineno)
            if shown is None:
                continue
            assert isinstance(stmt, ast.Expr), f"{where}: output shown after a statement that has no value"
            problem = mismatch(shown[0], value)
            assert problem is None, f"{where}: the output shown ({shown[1]}) has drifted: {problem}"
            checked += 1
    return namespace, checked
