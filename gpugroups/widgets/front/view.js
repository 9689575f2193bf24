// The panel's front end: devices, catalog and a prompt box over one gpugroups Manager.
//
// State arrives in the synced traits `state` (the manager's state JSON) and `progress` (the
// newest load_progress per running operation); `spec` carries the ops table's facts (each op's
// nature and its params' limits), so no limit or op list is written here a second time. Actions
// leave as custom messages {action, request_id, ...args} and come back as
// {reply_to, request_id, ok, result | error}. Every update patches the existing DOM (elements
// are keyed by id), so nothing re-renders and the layout does not jump while state streams in.
// This part holds the view: its header, the actions in flight and their replies, what is
// derived from the traits, and the closed view; each section is a part of its own.

const CLOSED = "This manager is closed (m.close()): nothing is loaded and its controls are off. Make a new manager and panel to go on.";
const KERNEL_GONE = "This panel's kernel restarted or stopped, and its manager with it: what it shows is the last state it had, and its controls are off. Run gg.panel(...) again in the kernel to go on.";

class PanelView {
  constructor(model, el) {
    this.model = model;
    this.pending = new Map(); // request_id -> {action, args, source}
    this.nextRequest = 0;
    this.root = h("div", { class: "gg-panel" });
    el.append(this.root);
    this.buildHeader();
    this.devices = new DevicesSection(this);
    this.catalog = new CatalogSection(this);
    this.prompt = new PromptSection(this);
    this.root.append(this.devices.el, this.catalog.el, this.prompt.el);

    this.onState = () => this.render();
    this.onMsg = (msg) => this.handleReply(msg);
    model.on("change:state", this.onState);
    model.on("change:progress", this.onState);
    model.on("msg:custom", this.onMsg);
    this.followKernel();
    this.render();
  }

  destroy() {
    this.model.off("change:state", this.onState);
    this.model.off("change:progress", this.onState);
    this.model.off("msg:custom", this.onMsg);
    if (this.kernel) this.kernel.statusChanged.disconnect(this.onKernelStatus);
  }

  // The manager lives in the kernel: once that restarts or stops, this panel shows a manager that
  // is gone. JupyterLab's widget manager exposes the kernel connection; where it does not (other
  // front ends), a send that fails says the same.
  followKernel() {
    const kernel = this.model.widget_manager && this.model.widget_manager.kernel;
    if (!kernel || !kernel.statusChanged) return;
    this.kernel = kernel;
    // a kernel that reports "starting" after this panel was made has started again (a restart
    // through the REST API skips "restarting")
    this.onKernelStatus = (_, status) => {
      if (["starting", "restarting", "autorestarting", "terminating", "dead"].includes(status)) this.loseKernel();
    };
    kernel.statusChanged.connect(this.onKernelStatus);
  }

  loseKernel() {
    if (this.kernelGone) return;
    this.kernelGone = true;
    this.pending.clear();
    this.render();
  }

  buildHeader() {
    this.summary = h("span", { class: "gg-summary" });
    this.activity = h("span", { class: "gg-activity" });
    this.root.append(h("div", { class: "gg-header" }, h("span", { class: "gg-title", text: "gpugroups" }), this.summary, this.activity));
    this.closedNote = h("div", { class: "gg-closed-note", role: "status", hidden: "" }, CLOSED);
    this.root.append(this.closedNote);
  }

  // ---- actions --------------------------------------------------------------------------
  // `source` names the section whose error line shows the reply's error.
  send(action, args, source) {
    const request_id = `r${Date.now().toString(36)}-${this.nextRequest++}`;
    try {
      this.model.send({ action, request_id, ...args });
    } catch (err) { // the comm is closed: its kernel restarted or stopped
      this.loseKernel();
      return null;
    }
    this.pending.set(request_id, { action, args, source });
    this.render();
    return request_id;
  }

  handleReply(msg) {
    if (!msg || msg.reply_to === undefined) return;
    // replies go to every view of this panel (a panel shown in two cells): each takes its own
    const request = this.pending.get(msg.request_id);
    if (!request) return;
    this.pending.delete(msg.request_id);
    const source = request.source;
    const errors = { catalog: this.catalog.error, devices: this.devices.error, prompt: this.prompt.error, picker: this.prompt.error };
    const line = errors[source];
    if (!msg.ok) {
      line.show(msg.error || { code: "internal_error", message: "no error details" });
      if (msg.reply_to === "process") this.prompt.showPredictions(null); // no older answer under the error
    } else {
      line.clear();
      if (msg.reply_to === "process") this.prompt.showPredictions(msg.result);
      if (msg.reply_to === "load" && source === "picker") this.prompt.lastSwitch = msg.result;
    }
    this.render();
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

  // ---- render ---------------------------------------------------------------------------
  render() {
    const state = this.model.get("state") || {};
    const devices = state.devices || [];
    const groups = state.groups || [];
    const ops = this.operations();
    const groupsById = new Map(groups.map((g) => [g.id, g]));
    setText(this.summary, `${devices.length} device${devices.length === 1 ? "" : "s"} · ${groups.length} group${groups.length === 1 ? "" : "s"} · v${state.version ?? 0}`);
    // the panel's own requests, less those already shown as their group's operation
    const opGroups = new Set(ops.map((op) => op.group_id));
    let asked = 0;
    for (const { args } of this.pending.values()) if (!args.group_id || !opGroups.has(args.group_id)) asked += 1;
    const running = ops.length + asked;
    setText(this.activity, running ? `${running} operation${running === 1 ? "" : "s"} running…` : "");
    this.root.classList.toggle("gg-is-busy", running > 0);
    this.devices.render(devices, groupsById, ops);
    this.catalog.render(state, groups, devices);
    this.prompt.render(groups, groupsById);
    this.renderClosed(Boolean(state.closed));
  }

  // A closed manager, or one whose kernel is gone, refuses every op: say so, and turn every
  // control off (after the other renders, which set `disabled` from the state alone).
  renderClosed(closed) {
    setText(this.closedNote, this.kernelGone ? KERNEL_GONE : CLOSED);
    closed = closed || Boolean(this.kernelGone);
    this.closedNote.hidden = !closed;
    this.root.classList.toggle("gg-closed", closed);
    if (!closed) return;
    for (const control of this.root.querySelectorAll("button, input, select, textarea")) control.disabled = true;
  }
}
