"""Rich notebook display of a Manager and of a ``process`` result: readable HTML tables.

Jupyter calls ``_repr_html_`` where HTML is shown and falls back to the plain ``repr`` elsewhere.
A process result stays a plain dict (``RichProcessResult`` only adds the HTML method), so JSON,
the REST API, the bridge and schema validation see exactly what they saw before. Light: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from .schema import ProcessResult, State

# Inline styles only (a notebook's HTML output has no stylesheet of ours), on JupyterLab's theme
# variables with fallbacks, so both themes and a plain classic notebook read well.
_TABLE = "border-collapse:collapse;font-size:var(--jp-ui-font-size1,13px);margin:4px 0"
_CELL = "padding:2px 8px;border-bottom:1px solid var(--jp-border-color2,#e0e0e0);text-align:left;vertical-align:middle"
_NUM = _CELL + ";text-align:right;font-variant-numeric:tabular-nums"
_BAR = "display:inline-block;width:120px;height:8px;border-radius:4px;background:var(--jp-layout-color3,#ddd);overflow:hidden;vertical-align:middle;margin-right:6px"
_FILL = "display:block;height:100%;background:var(--jp-brand-color1,#1976d2)"
_NOTE = "color:var(--jp-ui-font-color1,#212121);margin:2px 0"


def format_bytes(n: int | None) -> str:
    """``45.1 MiB``: bytes in binary units, as the panel writes them."""
    value = float(n or 0)
    if value <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.0f} {units[i]}" if value >= 100 or i == 0 else f"{value:.1f} {units[i]}"


def dev_label(device_ids: Iterable[int]) -> str:
    """``dev 1``, or ``dev 0+1+2`` for a group sharded over those devices in layer order."""
    return "dev " + "+".join(str(i) for i in device_ids)


def _table(head: list[str], rows: Iterable[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    """An HTML table; ``rows`` hold HTML already escaped, ``numeric`` the right-aligned columns."""
    th = "".join(f'<th style="{_NUM if i in numeric else _CELL}">{escape(h)}</th>' for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td style="{_NUM if i in numeric else _CELL}">{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table style="{_TABLE}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _code(text: str) -> str:
    """A token or continuation as the panel shows it: a JSON string literal, escaped for HTML."""
    return f"<code>{escape(json.dumps(text))}</code>"


def process_html(result: Mapping[str, Any]) -> str:
    """A ``process`` result: who answered where, then the predictions with probability bars."""
    timing = result.get("timing") or {}
    meta = [f"{result.get('model_id')} ({result.get('group_id')}) on {dev_label(result.get('device_ids') or [])}"]
    if timing.get("load_ms", 0) >= 1:
        meta.append(f"load {timing['load_ms']:.0f} ms")
    for key in ("forward_ms", "request_ms"):
        if isinstance(timing.get(key), (int, float)):
            meta.append(f"{key[:-3]} {timing[key]:.1f} ms")
    if timing.get("batch_size", 1) > 1:
        meta.append(f"batched ×{timing['batch_size']}")
    preds = result.get("predictions") or []
    with_text = any("text" in p for p in preds)
    head = ["#", "token", "probability", "logprob"] + (["continuation"] if with_text else [])
    rows = []
    for i, p in enumerate(preds):
        prob = max(0.0, min(1.0, float(p.get("probability", 0))))
        bar = f'<span style="{_BAR}"><span style="{_FILL};width:{100 * prob:.1f}%"></span></span>{100 * prob:.1f}%'
        row = [str(i + 1), _code(p.get("token", "")), bar, f"{p.get('logprob', float('nan')):.3f}"]
        rows.append(row + ([_code(p.get("text", ""))] if with_text else []))
    notes = "".join(f'<div style="{_NOTE}">note: {escape(str(n))}</div>' for n in result.get("notes") or [])
    prompt = f"prompt ({result.get('prompt_tokens', '?')} tokens{', truncated' if result.get('truncated') else ''}): "
    return (
        f'<div class="gg-process-result"><div style="{_NOTE}"><b>{escape(" · ".join(meta))}</b></div>'
        f'<div style="{_NOTE}">{escape(prompt)}{_code(str(result.get("prompt", "")))}</div>'
        f"{_table(head, rows, frozenset({0, 3}))}{notes}</div>"
    )


def manager_html(state: State) -> str:
    """A Manager: its devices (memory, what is resident, a sharded group's part) and its groups."""
    groups = {g["id"]: g for g in state["groups"]}
    device_rows = []
    for d in state["devices"]:
        mem = d["memory"]
        resident = []
        for gid in d["resident_groups"]:
            shards = groups[gid]["shards"] if gid in groups else []
            part = next((s["bytes"] for s in shards if s["device_id"] == d["device_id"]), None)
            resident.append(escape(gid) + (f" ({format_bytes(part)} part)" if len(shards) > 1 and part else ""))
        where = f"{d['node'][:8]} {d.get('host', '')}" if d.get("node") else ""
        device_rows.append([
            str(d["device_id"]), escape(d["device"]), escape(d["name"]), escape(where), escape(d["status"]),
            escape(f"{format_bytes(mem['manager_bytes'])} / {format_bytes(mem['total_bytes'])}"),
            ", ".join(resident) or "—",
        ])
    group_rows = [
        [
            escape(g["id"]), escape(g["kind"]), escape(format_bytes(g["memory_estimate_bytes"])),
            escape(dev_label(g["resident_on"])) if g["resident_on"] else "—", escape(g["status"]),
            "yes" if g["pinned"] else "", escape(g["current_model"]),
        ]
        for g in state["groups"]
    ]
    closed = f'<div style="{_NOTE}"><b>closed</b>: nothing is loaded and every op is refused.</div>' if state["closed"] else ""
    return (
        f'<div class="gg-manager"><div style="{_NOTE}"><b>gpugroups.Manager</b> · {state["num_devices"]} device(s) · '
        f"{len(state['groups'])} group(s) · v{state['version']}</div>{closed}"
        + _table(["id", "device", "name", "node", "status", "ours / total", "resident"], device_rows, frozenset({0}))
        + _table(["group", "kind", "estimate", "resident on", "status", "pinned", "current member"], group_rows,
                 frozenset({2}))
        + "</div>"
    )


class RichProcessResult(dict):  # type: ignore[type-arg]
    """What ``Manager.process`` returns: the plain result dict, shown as a table in a notebook."""

    def _repr_html_(self) -> str:
        return process_html(self)


def rich_process_result(result: ProcessResult) -> ProcessResult:
    """``result`` as a ``RichProcessResult`` (the same keys and values; JSON is unchanged)."""
    return RichProcessResult(result)  # type: ignore[return-value]
