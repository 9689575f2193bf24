// The Catalog section: a row per group (its kind, estimate, where it is resident; Load, Unload,
// Pin) and under it a row per member (Load or Switch), and the device that loads go to.

class CatalogSection {
  constructor(view) {
    this.view = view;
    this.error = new ErrorLine();
    this.deviceSelect = h("select", { class: "gg-device-select", title: "Where loads go" });
    this.body = h("tbody");
    const table = h("table", { class: "gg-catalog" },
      h("thead", {}, h("tr", {},
        h("th", { text: "Group / model" }), h("th", { text: "Kind" }), h("th", { class: "gg-num", text: "Estimate" }),
        h("th", { text: "Resident" }), h("th", { text: "" }))),
      this.body);
    this.el = h("section", { class: "gg-section gg-catalog-section" },
      h("div", { class: "gg-section-head" },
        h("h4", { class: "gg-section-title", text: "Catalog" }),
        h("label", { class: "gg-inline" }, "load on ", this.deviceSelect)),
      this.error.el, table);
  }

  // The device the "load on" picker names, as the args of a load ("auto": none).
  deviceArg() {
    const value = this.deviceSelect.value;
    return value === "" ? {} : { device_id: Number(value) };
  }

  render(state, groups, devices) {
    const options = [["", "auto"], ...devices.map((d) => [String(d.device_id), `${d.device_id} · ${d.device}`])];
    const lost = new Set(devices.filter((d) => d.status === "lost").map((d) => String(d.device_id)));
    syncKeyed(this.deviceSelect, options, (o) => o[0], (o) => h("option", { value: o[0] }), (node, o) => {
      setText(node, lost.has(o[0]) ? `${o[1]} (lost)` : o[1]);
      node.disabled = lost.has(o[0]);
    });
    const busy = this.view.busyGroups();
    const blocked = this.view.mutationPending();
    const rows = [];
    for (const g of groups) {
      rows.push({ key: `g:${g.id}`, group: g });
      for (const mid of g.models || []) rows.push({ key: `m:${mid}`, group: g, model: mid });
    }
    const roles = new Map((state.models || []).map((m) => [m.id, m]));
    syncKeyed(this.body, rows, (r) => r.key, (r) => (r.model ? this.modelRow(r) : this.groupRow(r)), (tr, r) => {
      const g = r.group;
      const resident = (g.resident_on || []).length > 0;
      const disabled = blocked || busy.has(g.id);
      tr.classList.toggle("gg-busy", busy.has(g.id));
      if (!r.model) {
        setText(tr._name, g.name && g.name !== g.id ? `${g.name} (${g.id})` : g.id);
        setText(tr._kind, g.kind || "");
        const estimated = g.memory_estimate_bytes > 0;  // 0: its files could not be read (yet)
        setText(tr._estimate, estimated ? formatBytes(g.memory_estimate_bytes) : "—");
        tr._estimate.title = estimated ? "" : "No estimate: this group's files could not be read; a load says why";
        setText(tr._resident, resident ? `${devLabel(g.resident_on)}${g.status === "in_use" ? " · in use" : ""}` : "—");
        setText(tr._pin, g.pinned ? "Unpin" : "Pin");
        tr._load.disabled = disabled || resident;
        tr._unload.disabled = disabled || !resident || g.pinned;
        tr._pin.disabled = disabled;
        tr.classList.toggle("gg-resident-row", resident);
        return;
      }
      const info = roles.get(r.model) || {};
      const current = resident && currentMember(g) === r.model;
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
    tr._load = h("button", { class: "gg-button gg-small", "data-action": "load_group", onclick: () => this.view.send("load_group", { group_id: g.id, ...this.deviceArg() }, "catalog") }, "Load");
    tr._unload = h("button", { class: "gg-button gg-small", "data-action": "unload_group", onclick: () => this.view.send("unload_group", { group_id: g.id }, "catalog") }, "Unload");
    tr._pin = h("button", {
      class: "gg-button gg-small", "data-action": "pin",
      onclick: () => {
        const pinned = tr._pin.textContent === "Pin";
        this.view.send("pin", { group_id: g.id, pinned, ...(pinned ? this.deviceArg() : {}) }, "catalog");
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
      // a switch stays where the group is (a pointer change); only a load goes where "load on" says
      onclick: () => this.view.send("load", {
        model_id: r.model, ...(tr._load.dataset.action === "switch" ? {} : this.deviceArg()),
      }, "catalog"),
    }, "Load");
    tr.append(
      h("td", { class: "gg-model-name" }, h("span", { class: "gg-tree", text: "└ " }), r.model, " ", tr._current),
      tr._role, h("td"), h("td"), h("td", { class: "gg-actions" }, tr._load));
    return tr;
  }
}
