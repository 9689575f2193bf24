"""What a person sees in the rendered panel, measured in the page: text contrast and narrow widths.

Used by the browser test on the live panel in JupyterLab's light and dark themes. The numbers
come from the browser's computed styles, so a theme variable or a CSS rule that makes text
unreadable or lets a card overflow fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: WCAG 2 AA for normal-size text (every text in the panel is normal size).
MIN_CONTRAST = 4.5

# Every element with its own visible text (or an input's value), its text colour composited
# over the backgrounds beneath it (alpha and opacity included), and the WCAG contrast ratio.
# Disabled controls are exempt (WCAG 1.4.3); a colour the script cannot parse is reported.
_CONTRAST_JS = """(root) => {
  const parse = (c) => {
    const m = /^rgba?\\(([^)]+)\\)$/.exec(c);
    if (!m) return null;
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const over = (top, bottom) => [0, 1, 2].map((i) => top[i] * top[3] + bottom[i] * (1 - top[3])).concat([1]);
  const background = (el) => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c === null) return null;
      if (c[3] > 0) layers.push(c);
      if (c[3] >= 1) break;
    }
    return layers.reverse().reduce((bg, c) => over(c, bg), [255, 255, 255, 1]);
  };
  const opacity = (el) => {
    let o = 1;
    for (let e = el; e; e = e.parentElement) o *= Number(getComputedStyle(e).opacity);
    return o;
  };
  const lum = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const out = [];
  for (const el of root.querySelectorAll('*')) {
    const field = ['INPUT', 'TEXTAREA', 'SELECT'].includes(el.tagName);
    const own = field ? el.value : [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join('');
    const style = getComputedStyle(el);
    if (!own.trim() || !el.getClientRects().length || style.visibility !== 'visible' || el.closest(':disabled')) continue;
    const bg = background(el);
    const fg = parse(style.color);
    const where = `${el.tagName.toLowerCase()}.${[...el.classList].join('.')} "${own.trim().slice(0, 30)}"`;
    if (!bg || !fg) { out.push({ where, ratio: 0, colors: `${style.color} on ?` }); continue; }
    const text = over([fg[0], fg[1], fg[2], fg[3] * opacity(el)], bg);
    const [hi, lo] = [lum(text), lum(bg)].sort((a, b) => b - a);
    out.push({ where, ratio: (hi + 0.05) / (lo + 0.05), colors: `${style.color} on rgb(${bg.slice(0, 3).map(Math.round)})` });
  }
  return out;
}"""

# Everything that sticks out of the panel, the panel's own horizontal overflow, and names that
# are cut with an ellipsis although the panel has room for them.
_WIDTH_JS = """(panel) => {
  const box = panel.getBoundingClientRect();
  const label = (el) => `${el.tagName.toLowerCase()}.${[...el.classList].join('.')} "${el.textContent.trim().slice(0, 30)}"`;
  const outside = [], cut = [];
  for (const el of panel.querySelectorAll('*')) {
    if (!el.getClientRects().length) continue;
    const r = el.getBoundingClientRect();
    if (r.width > 0 && (r.left < box.left - 0.5 || r.right > box.right + 0.5)) outside.push(label(el));
    const style = getComputedStyle(el);
    if (style.overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1 && el.matches(NAMES)) cut.push(label(el));
  }
  return { outside, cut, scrolls: panel.scrollWidth > panel.clientWidth + 1 };
}"""

# In each resident group's row of a device card: parts that overlap each other, and parts that
# stick out of their card (a load's badge and bar included).
_ROW_JS = """(panel) => {
  const label = (el) => `${el.tagName.toLowerCase()}.${[...el.classList].join('.')} "${el.textContent.trim().slice(0, 30)}"`;
  const overlaps = [], outside = [];
  for (const row of panel.querySelectorAll('.gg-resident-group')) {
    const card = row.closest('.gg-device').getBoundingClientRect();
    const parts = [...row.children].filter((el) => el.getClientRects().length).map((el) => [el, el.getBoundingClientRect()]);
    for (const [el, r] of parts) {
      if (r.left < card.left - 0.5 || r.right > card.right + 0.5 || r.bottom > card.bottom + 0.5) outside.push(label(el));
    }
    parts.forEach(([a, ra], i) => parts.slice(i + 1).forEach(([b, rb]) => {
      const w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
      const h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
      if (w > 0.5 && h > 0.5) overlaps.push(`${label(a)} / ${label(b)}`);
    }));
  }
  return { overlaps, outside };
}"""

#: Text that must show whole at any width the panel supports (group names, models, member ids).
NAMES = ".gg-resident-name, .gg-resident-member, .gg-device-name, .gg-group-name, .gg-model-name, .gg-legend, .gg-legend-total"


def low_contrast(panel: Any) -> list[dict[str, Any]]:
    """The panel's texts under ``MIN_CONTRAST``, as ``{where, ratio, colors}`` (empty when all pass)."""
    found = panel.evaluate(_CONTRAST_JS)
    assert len(found) > 20, found  # the walk really saw the panel's texts
    return [f for f in found if f["ratio"] < MIN_CONTRAST]


def layout_problems(panel: Any) -> dict[str, Any]:
    """``{outside, cut, scrolls}``: what sticks out of the panel as laid out now, names cut, sideways scrolling."""
    found: dict[str, Any] = panel.evaluate(_WIDTH_JS.replace("NAMES", repr(NAMES)))
    return found


def row_problems(panel: Any) -> dict[str, list[str]]:
    """``{overlaps, outside}`` of the device cards' group rows as laid out now (empty lists: none)."""
    found: dict[str, list[str]] = panel.evaluate(_ROW_JS)
    return found


def at_width(page: Any, panel: Any, width: int, screenshot: Path) -> dict[str, Any]:
    """Lay the panel out ``width`` px wide (as in a side panel), screenshot it, measure, restore."""
    panel.evaluate("(el, w) => { el.style.width = w + 'px'; el.scrollIntoView(); }", width)
    page.wait_for_timeout(100)  # one layout pass
    panel.screenshot(path=str(screenshot))
    found = {**layout_problems(panel), **{f"row_{k}": v for k, v in row_problems(panel).items()}}
    panel.evaluate("el => { el.style.width = ''; }")
    return found
