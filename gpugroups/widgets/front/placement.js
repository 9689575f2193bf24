// Where a view of the panel shows, and the module's entry point (anywidget calls it per view).
//
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
