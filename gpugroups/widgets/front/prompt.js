// The Prompt section: pick a model, set how many predictions and new tokens, predict; the
// most likely next tokens come back as a table with their probabilities.

class PromptSection {
  constructor(view) {
    this.view = view;
    this.lastSwitch = null; // the reply to the last switch the picker made: its time is shown
    this.userPicked = false;
    this.error = new ErrorLine();
    this.modelSelect = h("select", { class: "gg-model-select", title: "Model", onchange: () => this.pickModel() });
    const limits = this.view.params("process");
    const n = limits.num_predictions || {};
    const k = limits.max_new_tokens || {};
    this.numPredictions = h("input", { class: "gg-num-predictions", type: "number", min: n.minimum, max: n.cap ?? n.maximum, value: "5", title: "Number of predictions" });
    this.maxNewTokens = h("input", { class: "gg-max-new-tokens", type: "number", min: k.minimum, max: k.cap ?? k.maximum, value: String(k.default ?? 0), title: "Continue each prediction greedily this many tokens" });
    this.promptInput = h("textarea", { class: "gg-prompt-input", rows: "3", spellcheck: "false", maxlength: (limits.prompt || {}).max_length, placeholder: "Type a prompt; the panel shows the most likely next tokens." });
    for (const input of [this.promptInput, this.numPredictions, this.maxNewTokens]) {
      input.addEventListener("keydown", (event) => {
        // Keep Shift+Enter from reaching JupyterLab's "run cell" shortcut; use it to run here.
        event.stopPropagation();
        if (event.key === "Enter" && (event.shiftKey || event.ctrlKey)) {
          event.preventDefault();
          if (!this.runButton.disabled) this.runPrompt();  // one request at a time, as the button
        }
      });
    }
    this.runButton = h("button", { class: "gg-button gg-accent gg-run", onclick: () => this.runPrompt() }, "Predict");
    this.modelNote = h("div", { class: "gg-model-note" });
    this.resultMeta = h("div", { class: "gg-result-meta" });
    this.predBody = h("tbody");
    this.predTable = h("table", { class: "gg-predictions" },
      h("thead", {}, h("tr", {},
        h("th", { class: "gg-num", text: "#" }), h("th", { text: "Token" }), h("th", { text: "Probability" }),
        h("th", { class: "gg-num", text: "logprob" }), h("th", { class: "gg-text-col", text: "Continuation" }))),
      this.predBody);
    this.el = h("section", { class: "gg-section gg-prompt-section" },
      h("h4", { class: "gg-section-title", text: "Prompt" }),
      h("div", { class: "gg-prompt-controls" },
        h("label", { class: "gg-inline" }, "model ", this.modelSelect),
        h("label", { class: "gg-inline" }, "top ", this.numPredictions),
        h("label", { class: "gg-inline" }, "new tokens ", this.maxNewTokens),
        this.runButton),
      this.modelNote, this.promptInput, this.error.el, this.resultMeta, this.predTable);
  }

  render(groups, groupsById) {
    const models = [];
    for (const g of groups) for (const mid of g.models || []) models.push({ id: mid, group: g });
    // a picked model that left the catalog (its group unregistered): follow the current one again
    if (this.userPicked && !models.some((m) => m.id === this.modelSelect.value)) this.userPicked = false;
    syncKeyed(this.modelSelect, models, (m) => m.id, (m) => h("option", { value: m.id }), (opt, m) => {
      const loaded = (m.group.resident_on || []).length > 0;
      const current = loaded && currentMember(m.group) === m.id;
      setText(opt, `${m.id}${current ? "  ★" : loaded ? "  ●" : ""}`);
    });
    // Until the user picks a model, follow the current member on the first busy-or-loaded device.
    if (!this.userPicked) {
      const state = this.view.model.get("state") || {};
      const recent = (state.devices || []).map((d) => d.current_group).find((g) => g && g.id);
      const group = recent && groupsById.get(recent.id);
      const member = group && currentMember(group);
      if (member && this.modelSelect.value !== member) this.modelSelect.value = member;
    }
    const selected = models.find((m) => m.id === this.modelSelect.value);
    let note = "";
    if (selected) {
      const g = groupsById.get(selected.group.id) || selected.group;
      const resident = (g.resident_on || []).length > 0;
      const size = g.memory_estimate_bytes > 0 ? `~${formatBytes(g.memory_estimate_bytes)}` : "size unknown";
      if (!resident) note = `not loaded: predicting loads ${g.id} (${size})`;
      else if (currentMember(g) === selected.id) note = `current member of ${g.id} on ${devLabel(g.resident_on)}`;
      else {
        note = `member of resident ${g.id}, whose current member is ${currentMember(g)}: `
          + `Predict uses ${selected.id} all the same`;
      }
    }
    if (this.lastSwitch && this.lastSwitch.model_id === this.modelSelect.value) {
      note += ` · switched in ${(1000 * (this.lastSwitch.seconds || 0)).toFixed(1)} ms`;
    }
    setText(this.modelNote, note);
    let processing = false;
    for (const { action } of this.view.pending.values()) if (action === "process") processing = true;
    this.runButton.disabled = processing || !models.length;
    setText(this.runButton, processing ? "Predicting…" : "Predict");
  }

  // A member of a resident group becomes current at once (no memory operation), so picking
  // it switches; picking a model whose group is not resident leaves loading to Predict.
  pickModel() {
    this.userPicked = true;
    this.lastSwitch = null;
    const state = this.view.model.get("state") || {};
    const id = this.modelSelect.value;
    const group = (state.groups || []).find((g) => (g.models || []).includes(id));
    if (group && (group.resident_on || []).length && currentMember(group) !== id) {
      this.view.send("load", { model_id: id }, "picker");
    }
    this.view.render();
  }

  runPrompt() {
    const model_id = this.modelSelect.value;
    if (!model_id) return;
    const args = { model_id, prompt: this.promptInput.value };
    // a count as typed (the ops table's rules judge it, as for any client); empty: its default.
    // What the browser cannot read as a number ("--3") goes as the text it is, and is refused.
    const count = (input) => {
      if (input.validity && input.validity.badInput) return "(not a number)";
      return input.value.trim() === "" ? undefined : Number(input.value);
    };
    const n = count(this.numPredictions);
    const k = count(this.maxNewTokens);
    if (n !== undefined) args.num_predictions = n;
    if (k !== undefined) args.max_new_tokens = k;
    this.view.send("process", args, "prompt");
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
