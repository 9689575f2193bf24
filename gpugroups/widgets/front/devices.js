// The Devices section: a card per device (its memory bar and legend, the groups resident there
// with their load progress, a Clear button), under a header per node for Ray devices.

class DevicesSection {
  constructor(view) {
    this.view = view;
    this.error = new ErrorLine();
    this.list = h("div", { class: "gg-devices" });
    this.el = h("section", { class: "gg-section gg-devices-section" },
      h("h4", { class: "gg-section-title", text: "Devices" }), this.error.el, this.list);
  }

  // Ray devices carry `node`: their cards are grouped under a header per node (with its host),
  // nodes in the order their first device comes.
  render(devices, groupsById, ops) {
    const blocked = this.view.mutationPending();
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
    syncKeyed(this.list, items, (item) => item.key,
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
      class: "gg-button gg-small", "data-action": "clear_device",
      onclick: () => this.view.send("clear_device", { device_id: d.device_id }, "devices"),
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
    const clearable = (d.resident_groups || []).filter((id) => !groupsById.get(id)?.pinned);
    node._clear.disabled = blocked || lost || !clearable.length;
    node._clear.title = d.resident_groups?.length && !clearable.length
      ? "Every group here is pinned: unpin one to let Clear unload it" : "Unload every unpinned group here";
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
      const member = currentMember(g);
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
      // the badge says how far; the stage ("loading adapter x") is its tooltip, so the row stays one line
      if (op) status = `${op.op || "load"}ing ${Math.round(100 * (op.progress || 0))}%`;
      else if (g.status === "in_use") status = "in use";
      else if (gid === current && d.status === "busy") status = "busy";
      setText(li._state, status);
      li._state.title = (op && op.stage) || "";
      li._state.dataset.status = op ? "loading" : g.status === "in_use" ? "in_use" : status;
      setHidden(li._bar, !op);
      li._bar.firstChild.style.width = `${Math.round(100 * ((op && op.progress) || 0))}%`;
    });
  }
}
