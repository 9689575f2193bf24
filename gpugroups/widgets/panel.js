// The panel's front end: devices, catalog and a prompt box over one gpugroups Manager.
//
// State arrives in the synced traits `state` (the manager's state JSON) and `progress` (the
// newest load_progress per running operation); `spec` carries the ops table's facts (each op's
// nature and its params' limits), so no limit or op list is written here a second time. Actions leave as custom messages
// {action, request_id, ...args} and come back as {reply_to, request_id, ok, result | error}.
// Every update patches the existing DOM (elements are keyed by id), so nothing re-renders
// and the layout does not jump while state streams in.

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
  }
  clear() {
    setHidden(this.el, true);
  }
}

class PanelView {
  constructor(model, el) {
    this.model = model;
    this.pending = new Map(); // request_id -> {action, args, source}
    this.nextRequest = 0;
    this.lastSwitch = null;
    this.userPicked = false;
    this.root = h("div", { class: "gg-panel" });
    el.append(this.root);
    this.buildHeader();
    this.buildDevices();
    this.buildCatalog();
    this.buildPrompt();

    this.onState = () => this.render();
    this.onMsg = (msg) => this.handleReply(msg);
    model.on("change:state", this.onState);
    model.on("change:progress", this.onState);
    model.on("msg:custom", this.onMsg);
    this.render();
  }

  destroy() {
    this.model.off("change:state", this.onState);
    this.model.off("change:progress", this.onState);
    this.model.off("msg:custom", this.onMsg);
  }

  // ---- actions --------------------------------------------------------------------------
  send(action, args, source) {
    const request_id = `r${Date.now().toString(36)}-${this.nextRequest++}`;
    this.pending.set(request_id, { action, args, source });
    this.model.send({ action, request_id, ...args });
    this.render();
    return request_id;
  }

  handleReply(msg) {
    if (!msg || msg.reply_to === undefined) return;
    const request = this.pending.get(msg.request_id);
    this.pending.delete(msg.request_id);
    const source = request ? request.source : "catalog";
    const errors = { catalog: this.catalogError, devices: this.devicesError, prompt: this.promptError, picker: this.promptError };
    const line = errors[source] || this.catalogError;
    if (!msg.ok) {
      line.show(msg.error || { code: "internal_error", message: "no error details" });
    } else {
      line.clear();
      if (msg.reply_to === "process") this.showPredictions(msg.result);
      if (msg.reply_to === "load" && source === "picker") this.lastSwitch = msg.result;
    }
    this.render();
  }

  deviceArg() {
    const value = this.deviceSelect.value;
    return value === "" ? {} : { device_id: Number(value) };
  }

  // ---- layout ---------------------------------------------------------------------------
  buildHeader() {
    this.summary = h("span", { class: "gg-summary" });
    this.activity = h("span", { class: "gg-activity" });
    this.root.append(h("div", { class: "gg-header" }, h("span", { class: "gg-title", text: "gpugroups" }), this.summary, this.activity));
    this.closedNote = h("div", { class: "gg-closed-note", role: "status", hidden: "" },
      "This manager is closed (m.close()): nothing is loaded and its controls are off. Make a new manager and panel to go on.");
    this.root.append(this.closedNote);
  }

  buildDevices() {
    this.devicesError = new ErrorLine();
    this.devicesList = h("div", { class: "gg-devices" });
    this.root.append(
      h("section", { class: "gg-section gg-devices-section" },
        h("h4", { class: "gg-section-title", text: "Devices" }), this.devicesError.el, this.devicesList),
    );
  }

  buildCatalog() {
    this.catalogError = new ErrorLine();
    this.deviceSelect = h("select", { class: "gg-device-select", title: "Where loads go" });
    this.catalogBody = h("tbody");
    const table = h("table", { class: "gg-catalog" },
      h("thead", {}, h("tr", {},
        h("th", { text: "Group / model" }), h("th", { text: "Kind" }), h("th", { class: "gg-num", text: "Estimate" }),
        h("th", { text: "Resident" }), h("th", { text: "" }))),
      this.catalogBody);
    this.root.append(
      h("section", { class: "gg-section gg-catalog-section" },
        h("div", { class: "gg-section-head" },
          h("h4", { class: "gg-section-title", text: "Catalog" }),
          h("label", { class: "gg-inline" }, "load on ", this.deviceSelect)),
        this.catalogError.el, table),
    );
  }

  buildPrompt() {
    this.promptError = new ErrorLine();
    this.modelSelect = h("select", { class: "gg-model-select", title: "Model", onchange: () => this.pickModel() });
    const limits = this.params("process");
    const n = limits.num_predictions || {};
    const k = limits.max_new_tokens || {};
    this.numPredictions = h("input", { class: "gg-num-predictions", type: "number", min: n.minimum, max: n.cap ?? n.maximum, value: "5", title: "Number of predictions" });
    this.maxNewTokens = h("input", { class: "gg-max-new-tokens", type: "number", min: k.minimum, max: k.cap ?? k.maximum, value: String(k.default ?? 0), title: "Continue each prediction greedily this many tokens" });
    this.promptInput = h("textarea", { class: "gg-prompt-input", rows: "3", spellcheck: "false", maxlength: (limits.prompt || {}).max_length, placeholder: "Type a prompt; the panel shows the most likely next tokens." });
    this.promptInput.addEventListener("keydown", (event) => {
      // Keep Shift+Enter from reaching JupyterLab's "run cell" shortcut; use it to run here.
      event.stopPropagation();
      if (event.key === "Enter" && (event.shiftKey || event.ctrlKey)) {
        event.preventDefault();
        this.runPrompt();
      }
    });
    this.runButton = h("button", { class: "gg-button gg-accent gg-run", onclick: () => this.runPrompt() }, "Predict");
    this.modelNote = h("div", { class: "gg-model-note" });
    this.resultMeta = h("div", { class: "gg-result-meta" });
    this.predBody = h("tbody");
    this.predTable = h("table", { class: "gg-predictions" },
      h("thead", {}, h("tr", {},
        h("th", { class: "gg-num", text: "#" }), h("th", { text: "Token" }), h("th", { text: "Probability" }),
        h("th", { class: "gg-num", text: "logprob" }), h("th", { class: "gg-text-col", text: "Continuation" }))),
      this.predBody);
    this.root.append(
      h("section", { class: "gg-section gg-prompt-section" },
        h("h4", { class: "gg-section-title", text: "Prompt" }),
        h("div", { class: "gg-prompt-controls" },
          h("label", { class: "gg-inline" }, "model ", this.modelSelect),
          h("label", { class: "gg-inline" }, "top ", this.numPredictions),
          h("label", { class: "gg-inline" }, "new tokens ", this.maxNewTokens),
          this.runButton),
        this.modelNote, this.promptInput, this.promptError.el, this.resultMeta, this.predTable),
    );
  }

  // ---- derived state --------------------------------------------------------------------
  operations() {
    const state = this.model.get("state") || {};
    const progress = this.model.get("progress") || {};
    const ops = (state.operations || []).map((op) => ({ ...op, ...(progress[String(op.id)] || {}) }));
    const known = new Set(ops.map((op) => String(op.id)));
    for (const [id, p] of Object.entries(progress)) if (!known.has(id)) ops.push({ id, op: "load", ...p });
    return ops;
  }

  busyGroups() {
    const busy = new Set(this.operations().map((op) => op.group_id));
    for (const { args } of this.pending.values()) if (args.group_id) busy.add(args.group_id);
    return busy;
  }

  // The ops table's facts (the `spec` trait): {op: {slow, may_load, changes_residency, params}}.
  opSpec(action) {
    return ((this.model.get("spec") || {}).ops || {})[action] || {};
  }

  params(action) {
    return this.opSpec(action).params || {};
  }

  mutationPending() {
    for (const { action } of this.pending.values()) if (this.opSpec(action).changes_residency) return true;
    return false;
  }

  currentMember(group) {
    if (group.current_model) return group.current_model;
    return null;
  }

  // ---- render ---------------------------------------------------------------------------
  render() {
    const state = this.model.get("state") || {};
    const devices = state.devices || [];
    const groups = state.groups || [];
    const ops = this.operations();
    const groupsById = new Map(groups.map((g) => [g.id, g]));
    setText(this.summary, `${devices.length} device${devices.length === 1 ? "" : "s"} · ${groups.length} group${groups.length === 1 ? "" : "s"} · v${state.version ?? 0}`);
    const running = ops.length + this.pending.size;
    setText(this.activity, running ? `${running} operation${running === 1 ? "" : "s"} running…` : "");
    this.root.classList.toggle("gg-is-busy", running > 0);
    this.renderDevices(devices, groupsById, ops);
    this.renderCatalog(state, groups, devices);
    this.renderPromptControls(groups, groupsById);
    this.renderClosed(Boolean(state.closed));
  }

  // A closed manager refuses every op: say so, and turn every control off (after the other
  // renders, which set `disabled` from the state alone).
  renderClosed(closed) {
    this.closedNote.hidden = !closed;
    this.root.classList.toggle("gg-closed", closed);
    if (!closed) return;
    for (const control of this.root.querySelectorAll("button, input, select, textarea")) control.disabled = true;
  }

  // Ray devices carry `node`: their cards are grouped under a header per node (with its host),
  // nodes in the order their first device comes.
  renderDevices(devices, groupsById, ops) {
    const blocked = this.mutationPending();
    const items = [];
    if (devices.some((d) => d.node)) {
      const byNode = new Map();
      for (const d of devices) {
        const key = d.node || "";
        if (!byNode.has(key)) byNode.set(key, []);
        byNode.get(key).push(d);
      }
      for (const [node, members] of byNode) {
        items.push({ key: `n:${node}`, node, host: members[0].host || "" });
        for (const d of members) items.push({ key: `d:${d.device_id}`, device: d });
      }
    } else {
      for (const d of devices) items.push({ key: `d:${d.device_id}`, device: d });
    }
    syncKeyed(this.devicesList, items, (item) => item.key,
      (item) => (item.device ? this.deviceCard(item.device) : this.nodeHeader()),
      (node, item) => (item.device ? this.updateDevice(node, item.device, groupsById, ops, blocked) : this.updateNode(node, item)));
  }

  nodeHeader() {
    const node = h("div", { class: "gg-node" });
    node._name = h("span", { class: "gg-node-name" });
    node._host = h("span", { class: "gg-node-host" });
    node.append(node._name, node._host);
    return node;
  }

  updateNode(node, item) {
    node.dataset.node = item.node;
    setText(node._name, item.node ? `node ${item.node.slice(0, 8)}` : "local");
    node._name.title = item.node;
    setText(node._host, item.host);
  }

  deviceCard(d) {
    const node = h("div", { class: "gg-device", "data-device-id": String(d.device_id) });
    node._name = h("span", { class: "gg-device-name" });
    node._desc = h("span", { class: "gg-device-desc" });
    node._status = h("span", { class: "gg-badge" });
    node._queue = h("span", { class: "gg-queue" });
    node._clear = h("button", {
      class: "gg-button gg-small", "data-action": "clear_device", title: "Unload every unpinned group here",
      onclick: () => this.send("clear_device", { device_id: d.device_id }, "devices"),
    }, "Clear");
    node._ours = h("span", { class: "gg-mem-ours" });
    node._other = h("span", { class: "gg-mem-other" });
    node._free = h("span", { class: "gg-mem-free" });
    node._memText = h("div", { class: "gg-mem-text" });
    node._memParts = ["ours", "other", "free", "reserved"].map((kind) => h("span", { class: `gg-legend gg-legend-${kind}` }));
    node._memParts[3].title = "free, but outside the memory budget gpugroups may fill";
    node._memTotal = h("span", { class: "gg-legend-total" });
    node._memText.append(...node._memParts, node._memTotal);
    node._groups = h("ul", { class: "gg-resident" });
    node.append(
      h("div", { class: "gg-device-head" }, node._name, node._desc, node._status, node._queue, node._clear),
      h("div", { class: "gg-membar", role: "img" }, node._ours, node._other, node._free, h("span", { class: "gg-mem-reserved" })),
      node._memText, node._groups);
    return node;
  }

  updateDevice(node, d, groupsById, ops, blocked) {
    const mem = d.memory || {};
    const whole = Math.max(mem.total_bytes || 0, mem.budget_bytes || 0, 1);
    const ours = mem.manager_bytes ?? 0;
    const other = mem.other_bytes ?? Math.max(0, (mem.used_bytes || 0) - ours);
    setText(node._name, `${d.device_id} · ${d.device}`);
    setText(node._desc, d.name && d.name !== d.device ? d.name : "");
    node._desc.title = node._desc.textContent;
    const status = d.status || "idle";
    const lost = status === "lost";
    setText(node._status, status);
    node._status.dataset.status = status;
    node._status.title = lost ? "this device's node is unreachable: its groups are gone and nothing is placed here" : "";
    node.classList.toggle("gg-lost", lost);
    setText(node._queue, `queue ${d.queue_depth ?? 0}`);
    node._clear.disabled = blocked || lost || !(d.resident_groups || []).length;
    node._ours.style.width = `${percent(ours, whole)}%`;
    node._other.style.width = `${percent(other, whole)}%`;
    node._ours.style.minWidth = ours > 0 ? "3px" : "0";  // a small share stays visible
    node._free.style.width = `${percent(mem.free_bytes || 0, whole)}%`;
    // The rest of the bar (its background) is what lies outside the budget: label it too.
    const reserved = Math.max(0, whole - ours - other - (mem.free_bytes || 0));
    const labels = [`ours ${formatBytes(ours)}`, `others ${formatBytes(other)}`, `free ${formatBytes(mem.free_bytes)}`,
      `reserved ${formatBytes(reserved)}`];
    labels.forEach((label, i) => setText(node._memParts[i], label));
    setHidden(node._memParts[3], reserved < whole / 200);
    setText(node._memTotal, `of ${formatBytes(whole)}`);
    node.querySelector(".gg-membar").setAttribute("aria-label", `${labels.join(", ")} of ${formatBytes(whole)}`);
    const resident = [...(d.resident_groups || [])];
    for (const op of ops) {
      if (op.device_id === d.device_id && op.group_id && !resident.includes(op.group_id)) resident.push(op.group_id);
    }
    const current = d.current_group ? d.current_group.id : resident[0];
    syncKeyed(node._groups, resident, (g) => g, () => {
      const li = h("li", { class: "gg-resident-group" });
      li._name = h("span", { class: "gg-resident-name" });
      li._member = h("span", { class: "gg-resident-member" });
      li._pin = h("span", { class: "gg-pin-mark", title: "pinned", text: "pinned" });
      li._share = h("span", { class: "gg-resident-share" });
      li._state = h("span", { class: "gg-badge" });
      li._bar = h("span", { class: "gg-progress" }, h("span", { class: "gg-progress-fill" }));
      li.append(li._name, li._member, li._share, li._pin, li._state, li._bar);
      return li;
    }, (li, gid) => {
      const g = groupsById.get(gid) || { id: gid, name: gid };
      const op = ops.find((o) => o.group_id === gid && o.device_id === d.device_id);
      li.dataset.group = gid;
      li.classList.toggle("gg-current", gid === current);
      setText(li._name, `${gid === current ? "★ " : ""}${g.name || gid}`);
      li._name.title = `${g.name || gid} (${gid})`;
      const member = this.currentMember(g);
      setText(li._member, member && member !== g.name ? member : "");
      setHidden(li._pin, !g.pinned);
      // A sharded group shows on every card it spans, with the part of its bytes held here.
      const shards = g.shards || [];
      const share = shards.length > 1 ? shards.findIndex((s) => s.device_id === d.device_id) : -1;
      setText(li._share, share >= 0 ? `part ${share + 1}/${shards.length} · ${formatBytes(shards[share].bytes)}` : "");
      li._share.title = share >= 0 ? `sharded over ${devLabel(g.resident_on || [])}, layers in that order` : "";
      setHidden(li._share, share < 0);
      li.dataset.shareBytes = share >= 0 ? String(shards[share].bytes) : "";
      let status = "idle";
      if (op) status = `${op.op || "load"}ing ${Math.round(100 * (op.progress || 0))}%${op.stage ? ` · ${op.stage}` : ""}`;
      else if (g.status === "in_use") status = "in use";
      else if (gid === current && d.status === "busy") status = "busy";
      setText(li._state, status);
      li._state.dataset.status = op ? "loading" : g.status === "in_use" ? "in_use" : status;
      setHidden(li._bar, !op);
      li._bar.firstChild.style.width = `${Math.round(100 * ((op && op.progress) || 0))}%`;
    });
  }

  renderCatalog(state, groups, devices) {
    const options = [["", "auto"], ...devices.map((d) => [String(d.device_id), `${d.device_id} · ${d.device}`])];
    const lost = new Set(devices.filter((d) => d.status === "lost").map((d) => String(d.device_id)));
    syncKeyed(this.deviceSelect, options, (o) => o[0], (o) => h("option", { value: o[0] }), (node, o) => {
      setText(node, lost.has(o[0]) ? `${o[1]} (lost)` : o[1]);
      node.disabled = lost.has(o[0]);
    });
    const busy = this.busyGroups();
    const blocked = this.mutationPending();
    const rows = [];
    for (const g of groups) {
      rows.push({ key: `g:${g.id}`, group: g });
      for (const mid of g.models || []) rows.push({ key: `m:${mid}`, group: g, model: mid });
    }
    const roles = new Map((state.models || []).map((m) => [m.id, m]));
    syncKeyed(this.catalogBody, rows, (r) => r.key, (r) => (r.model ? this.modelRow(r) : this.groupRow(r)), (tr, r) => {
      const g = r.group;
      const resident = (g.resident_on || []).length > 0;
      const disabled = blocked || busy.has(g.id);
      tr.classList.toggle("gg-busy", busy.has(g.id));
      if (!r.model) {
        setText(tr._name, g.name && g.name !== g.id ? `${g.name} (${g.id})` : g.id);
        setText(tr._kind, g.kind || "");
        setText(tr._estimate, formatBytes(g.memory_estimate_bytes));
        setText(tr._resident, resident ? `${devLabel(g.resident_on)}${g.status === "in_use" ? " · in use" : ""}` : "—");
        setText(tr._pin, g.pinned ? "Unpin" : "Pin");
        tr._load.disabled = disabled || resident;
        tr._unload.disabled = disabled || !resident || g.pinned;
        tr._pin.disabled = disabled;
        tr.classList.toggle("gg-resident-row", resident);
        return;
      }
      const info = roles.get(r.model) || {};
      const current = resident && this.currentMember(g) === r.model;
      setText(tr._role, info.role || "");
      setText(tr._current, current ? "current" : "");
      setHidden(tr._current, !current);
      setText(tr._load, current ? "Current" : resident ? "Switch" : "Load");
      tr._load.dataset.action = resident ? "switch" : "load";
      tr._load.disabled = disabled || current;
      tr.classList.toggle("gg-current", current);
    });
  }

  groupRow(r) {
    const g = r.group;
    const tr = h("tr", { class: "gg-group-row", "data-group": g.id });
    tr._name = h("span", { class: "gg-group-name" });
    tr._kind = h("td", { class: "gg-kind" });
    tr._estimate = h("td", { class: "gg-num gg-estimate" });
    tr._resident = h("td", { class: "gg-resident-on" });
    tr._load = h("button", { class: "gg-button gg-small", "data-action": "load_group", onclick: () => this.send("load_group", { group_id: g.id, ...this.deviceArg() }, "catalog") }, "Load");
    tr._unload = h("button", { class: "gg-button gg-small", "data-action": "unload_group", onclick: () => this.send("unload_group", { group_id: g.id }, "catalog") }, "Unload");
    tr._pin = h("button", {
      class: "gg-button gg-small", "data-action": "pin",
      onclick: () => {
        const pinned = tr._pin.textContent === "Pin";
        this.send("pin", { group_id: g.id, pinned, ...(pinned ? this.deviceArg() : {}) }, "catalog");
      },
    }, "Pin");
    tr.append(h("td", {}, tr._name), tr._kind, tr._estimate, tr._resident, h("td", { class: "gg-actions" }, tr._load, tr._unload, tr._pin));
    return tr;
  }

  modelRow(r) {
    const tr = h("tr", { class: "gg-model-row", "data-model": r.model, "data-group": r.group.id });
    tr._role = h("td", { class: "gg-kind" });
    tr._current = h("span", { class: "gg-badge gg-current-badge", hidden: "" });
    tr._load = h("button", {
      class: "gg-button gg-small", "data-action": "load",
      onclick: () => this.send("load", { model_id: r.model, ...this.deviceArg() }, "catalog"),
    }, "Load");
    tr.append(
      h("td", { class: "gg-model-name" }, h("span", { class: "gg-tree", text: "└ " }), r.model, " ", tr._current),
      tr._role, h("td"), h("td"), h("td", { class: "gg-actions" }, tr._load));
    return tr;
  }

  renderPromptControls(groups, groupsById) {
    const models = [];
    for (const g of groups) for (const mid of g.models || []) models.push({ id: mid, group: g });
    syncKeyed(this.modelSelect, models, (m) => m.id, (m) => h("option", { value: m.id }), (opt, m) => {
      const loaded = (m.group.resident_on || []).length > 0;
      const current = loaded && this.currentMember(m.group) === m.id;
      setText(opt, `${m.id}${current ? "  ★" : loaded ? "  ●" : ""}`);
    });
    // Until the user picks a model, follow the current member on the first busy-or-loaded device.
    if (!this.userPicked) {
      const state = this.model.get("state") || {};
      const recent = (state.devices || []).map((d) => d.current_group).find((g) => g && g.id);
      const group = recent && groupsById.get(recent.id);
      const member = group && this.currentMember(group);
      if (member && this.modelSelect.value !== member) this.modelSelect.value = member;
    }
    const selected = models.find((m) => m.id === this.modelSelect.value);
    let note = "";
    if (selected) {
      const g = groupsById.get(selected.group.id) || selected.group;
      const resident = (g.resident_on || []).length > 0;
      if (!resident) note = `not loaded: predicting loads ${g.id} (~${formatBytes(g.memory_estimate_bytes)})`;
      else if (this.currentMember(g) === selected.id) note = `current member of ${g.id} on ${devLabel(g.resident_on)}`;
      else note = `member of resident ${g.id}: selecting switches instantly`;
    }
    if (this.lastSwitch && this.lastSwitch.model_id === this.modelSelect.value) {
      note += ` · switched in ${(1000 * (this.lastSwitch.seconds || 0)).toFixed(1)} ms`;
    }
    setText(this.modelNote, note);
    let processing = false;
    for (const { action } of this.pending.values()) if (action === "process") processing = true;
    this.runButton.disabled = processing || !models.length;
    setText(this.runButton, processing ? "Predicting…" : "Predict");
  }

  // A member of a resident group becomes current at once (no memory operation), so picking
  // it switches; picking a model whose group is not resident leaves loading to Predict.
  pickModel() {
    this.userPicked = true;
    this.lastSwitch = null;
    const state = this.model.get("state") || {};
    const id = this.modelSelect.value;
    const group = (state.groups || []).find((g) => (g.models || []).includes(id));
    if (group && (group.resident_on || []).length && this.currentMember(group) !== id) {
      this.send("load", { model_id: id }, "picker");
    }
    this.render();
  }

  runPrompt() {
    const model_id = this.modelSelect.value;
    if (!model_id) return;
    const args = { model_id, prompt: this.promptInput.value };
    const n = parseInt(this.numPredictions.value, 10);
    if (Number.isFinite(n)) args.num_predictions = n;
    const k = parseInt(this.maxNewTokens.value, 10);
    if (Number.isFinite(k) && k > 0) args.max_new_tokens = k;
    this.send("process", args, "prompt");
  }

  showPredictions(result) {
    const preds = (result && result.predictions) || [];
    const timing = (result && result.timing) || {};
    const parts = result ? [`${result.model_id} (${result.group_id}) on dev ${result.device_id}`] : [];
    if (timing.load_ms >= 1) parts.push(`load ${timing.load_ms.toFixed(0)} ms`);
    if (Number.isFinite(timing.forward_ms)) parts.push(`forward ${timing.forward_ms.toFixed(1)} ms`);
    if (Number.isFinite(timing.request_ms)) parts.push(`request ${timing.request_ms.toFixed(1)} ms`);
    if (timing.batch_size > 1) parts.push(`batched ×${timing.batch_size}`);
    for (const note of (result && result.notes) || []) parts.push(String(note));
    setText(this.resultMeta, parts.join(" · "));
    const withText = preds.some((p) => p.text !== undefined);
    this.predTable.classList.toggle("gg-with-text", withText);
    syncKeyed(this.predBody, preds.map((p, i) => ({ ...p, rank: i })), (p) => p.rank, () => {
      const tr = h("tr", { class: "gg-prediction" });
      tr._rank = h("td", { class: "gg-num" });
      tr._token = h("code", { class: "gg-token" });
      tr._fill = h("span", { class: "gg-prob-fill" });
      tr._prob = h("span", { class: "gg-prob-text" });
      tr._logprob = h("td", { class: "gg-num gg-logprob" });
      tr._text = h("code", { class: "gg-continuation" });
      tr.append(tr._rank, h("td", {}, tr._token), h("td", { class: "gg-prob" }, h("span", { class: "gg-prob-bar" }, tr._fill), tr._prob),
        tr._logprob, h("td", { class: "gg-text-col" }, tr._text));
      return tr;
    }, (tr, p) => {
      tr.dataset.token = p.token;
      tr.dataset.tokenId = String(p.token_id);
      tr.dataset.probability = String(p.probability);
      setText(tr._rank, String(p.rank + 1));
      setText(tr._token, JSON.stringify(p.token));
      tr._fill.style.width = `${percent(p.probability, 1)}%`;
      setText(tr._prob, `${(100 * p.probability).toFixed(1)}%`);
      setText(tr._logprob, Number.isFinite(p.logprob) ? p.logprob.toFixed(3) : "");
      setText(tr._text, p.text === undefined ? "" : JSON.stringify(p.text));
    });
  }
}

// A panel opened with gg.panel(sidebar=True) has a view in JupyterLab's right side panel
// (inside the sidecar extension's output area), marked with the `sidebar_view` trait. A view of
// the same panel elsewhere (the cell that made it) stands aside as a one-line pointer while that
// side-panel view exists, and shows the whole panel, saying why, where none does: Notebook 7 and
// other front ends without the extension, or after the tab was closed. Side-panel views announce
// their coming and going on `window`, since views of one panel know nothing of each other.
const SIDEBAR_EVENT = "gg-panel-sidebar";

class Placement {
  constructor(model, el, root) {
    this.key = model.get("sidebar_view") || "";
    this.el = el;
    this.root = root;
    this.docked = false;
    this.frame = 0;
    this.onAnnounce = () => this.update();
    this.note = h("div", { class: "gg-placement-note", role: "status", hidden: "" });
    root.prepend(this.note);
    if (this.key) this.whenAttached();
  }

  // anywidget renders into an element that is not in the page yet; where it lands decides.
  whenAttached() {
    if (!this.el.isConnected) {
      this.frame = requestAnimationFrame(() => this.whenAttached());
      return;
    }
    this.docked = this.el.closest(".jupyterlab-sidecar") !== null;
    if (this.docked) {
      this.root.dataset.sidebarView = this.key;
      this.root.classList.add("gg-in-sidebar");
      window.dispatchEvent(new Event(SIDEBAR_EVENT));
    } else {
      window.addEventListener(SIDEBAR_EVENT, this.onAnnounce);
      this.update();
    }
  }

  update() {
    const key = CSS.escape(this.key);
    const inSidebar = document.querySelector(`.jupyterlab-sidecar .gg-panel[data-sidebar-view="${key}"]`) !== null;
    this.root.classList.toggle("gg-pointer", inSidebar);
    setText(this.note, inSidebar
      ? "This panel is in JupyterLab's right side panel (the gpugroups tab)."
      : "Shown here: no side panel holds this panel (gg.panel(sidebar=True) needs JupyterLab, and its tab may have been closed).");
    setHidden(this.note, false);
  }

  destroy() {
    cancelAnimationFrame(this.frame);
    window.removeEventListener(SIDEBAR_EVENT, this.onAnnounce);
    if (this.docked) {
      delete this.root.dataset.sidebarView;
      window.dispatchEvent(new Event(SIDEBAR_EVENT));
    }
  }
}

export default {
  render({ model, el }) {
    const view = new PanelView(model, el);
    const placement = new Placement(model, el, view.root);
    return () => {
      placement.destroy();
      view.destroy();
    };
  },
};
