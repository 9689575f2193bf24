// Helpers every part of the panel's front end uses: building elements, patching text without
// needless writes, keeping keyed lists in order, byte and device labels, the error line.

function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value);
  }
  for (const child of children) el.append(child);
  return el;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function setHidden(el, hidden) {
  if (el.hidden !== hidden) el.hidden = hidden;
}

export function formatBytes(n) {
  if (!Number.isFinite(n) || n <= 0) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

// Where a group is resident: "dev 1", or "dev 0+1+2" for a group sharded in that layer order.
export function devLabel(ids) {
  return `dev ${ids.join("+")}`;
}

function percent(part, whole) {
  return whole > 0 ? Math.max(0, Math.min(100, (100 * part) / whole)) : 0;
}

// The member of `group` that answers its prompts now, or null.
function currentMember(group) {
  return group.current_model || null;
}

// Keep `container`'s children in the order of `items`, one per key: build the missing ones
// with `create`, refresh every one with `update`, drop the stale ones.
function syncKeyed(container, items, keyOf, create, update) {
  const byKey = container._ggKeyed || (container._ggKeyed = new Map());
  const wanted = new Set();
  let cursor = container.firstChild;
  for (const item of items) {
    const key = String(keyOf(item));
    wanted.add(key);
    let node = byKey.get(key);
    if (!node) {
      node = create(item);
      byKey.set(key, node);
    }
    update(node, item);
    if (node !== cursor) container.insertBefore(node, cursor);
    else cursor = cursor.nextSibling;
  }
  for (const [key, node] of byKey) {
    if (!wanted.has(key)) {
      node.remove();
      byKey.delete(key);
    }
  }
}

// A section's line for the error of its last failed action, until dismissed or the next success.
class ErrorLine {
  constructor() {
    this.el = h("div", { class: "gg-error", role: "alert", hidden: "" });
    this.code = h("span", { class: "gg-error-code" });
    this.message = h("span", { class: "gg-error-message" });
    const close = h("button", { class: "gg-error-close", title: "Dismiss", onclick: () => this.clear() }, "×");
    this.el.append(this.code, this.message, close);
  }
  show(error) {
    setText(this.code, error.code || "error");
    setText(this.message, error.message || "");
    setHidden(this.el, false);
    this.el.scrollIntoView({ block: "nearest" });  // a long catalog may hold it out of view
  }
  clear() {
    setHidden(this.el, true);
  }
}
