"""Where the panel sits and what a closed one says, in a real browser (Chromium, JupyterLab, Notebook 7).

``gg.panel(m, sidebar=True)`` in JupyterLab: the panel opens in the right side area, stays in view
while the notebook scrolls, answers clicks there, and its view in the cell is a one-line pointer;
in Notebook 7 (no side panel for it) the cell shows the whole panel and says why. After
``m.close()`` the panel says the manager is closed and every control is off.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests import panel_checks
from tests.labdriver import (
    ARTIFACTS,
    CHROMIUM,
    open_notebook,
    open_notebook7,
    page_for,
    run_all,
    run_cell,
    shot,
    wait_kernel_idle,
    write_notebook,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing"),
]

SETUP = "import json\nimport gpugroups as gg\nm = gg.Manager(devices='virtual:2x256MiB')\nm.load('pycode-docs')\n"
#: Enough text below the panel's cell that scrolling to its end takes that cell out of view.
NOTES = "# Notes\n\n" + "A line of notes to scroll past.\n\n" * 60
VISIBLE_NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"

# Whether the element's centre is on screen and the element (or a child) is what is drawn there.
_ON_TOP = """(el) => {
  const r = el.getBoundingClientRect();
  const x = r.left + r.width / 2, y = r.top + Math.min(r.height / 2, 20);
  if (x < 0 || y < 0 || x > innerWidth || y > innerHeight) return false;
  const hit = document.elementFromPoint(x, y);
  return hit !== null && el.contains(hit);
}"""


def test_panel_in_the_right_side_panel(lab: dict[str, Any], browser: Any) -> None:
    """Opened in JupyterLab's right side area, in view after scrolling, a click there switches member,
    showing it again replaces it, and closing the panel closes its tab."""
    write_notebook(lab, "sidebar.ipynb", SETUP + "p = gg.panel(m, sidebar=True)\np", NOTES, "print('end of the notes')")
    with page_for(browser, "sidebar") as page:
        open_notebook(page, lab, "sidebar.ipynb")
        wait_kernel_idle(lab, "sidebar.ipynb")
        run_all(page)
        side = page.locator("#jp-right-stack .jupyterlab-sidecar .gg-panel")
        side.wait_for()
        end = page.locator(f"{VISIBLE_NOTEBOOK} .jp-OutputArea-output", has_text="end of the notes")
        end.wait_for()

        # In the right side area, right of the notebook, under its own current tab.
        tab = page.locator(".jp-SideBar.jp-mod-right .lm-TabBar-tab", has_text=re.compile(r"^gpugroups$"))
        assert "lm-mod-current" in (tab.get_attribute("class") or "")
        notebook = page.locator(VISIBLE_NOTEBOOK).bounding_box()
        panel_box = side.bounding_box()
        assert notebook and panel_box and panel_box["x"] >= notebook["x"] + notebook["width"]

        # The cell's view of the same panel is a one-line pointer to it.
        pointer = page.locator(f"{VISIBLE_NOTEBOOK} .jp-Cell .jp-OutputArea-output .gg-panel")
        page.wait_for_function(
            "() => document.querySelector('.jp-Cell .jp-OutputArea-output .gg-panel')?.classList.contains('gg-pointer')"
        )
        assert "right side panel" in pointer.locator(".gg-placement-note").inner_text()
        assert pointer.locator(".gg-devices-section").is_hidden()
        assert side.locator(".gg-placement-note").is_hidden()

        # Scroll the notebook to its end: the cell leaves the view, the side panel stays.
        end.scroll_into_view_if_needed()
        page.wait_for_timeout(200)  # let the scroll settle
        assert not pointer.evaluate(_ON_TOP)
        assert side.locator(".gg-header").evaluate(_ON_TOP), "the side panel is not in view after scrolling"
        shot(page, page.locator("#jp-main-content-panel"), "sidebar.png")
        switch = side.locator("tr.gg-model-row[data-model='pycode-tests'] button")
        switch.scroll_into_view_if_needed()  # within the side panel, which scrolls on its own
        assert end.evaluate(_ON_TOP), "scrolling the side panel moved the notebook"
        assert switch.evaluate(_ON_TOP)

        # A click there acts: the member switches, in the kernel's manager too.
        switch.click()
        page.wait_for_function(
            "() => document.querySelector(\"#jp-right-stack .gg-panel tr.gg-model-row[data-model='pycode-tests'] button\").textContent === 'Current'"
        )
        current = run_cell(
            page, "print('@@' + json.dumps(next(g for g in m.state()['groups'] if g['id'] == 'pycode')['current_model']))"
        )
        assert current == "pycode-tests"

        # Readable at the side panel's own width.
        assert not panel_checks.low_contrast(side)
        assert panel_checks.layout_problems(side) == {"outside": [], "cut": [], "scrolls": False}

        # The same manager's side panel shown again (a cell run twice) replaces it: one tab still.
        replaced = run_cell(page, "old = p\np = gg.panel(m, sidebar=True)\nprint('@@' + json.dumps(old.comm is None))")
        assert replaced is True
        page.wait_for_function(
            "() => document.querySelectorAll('#jp-right-stack .jupyterlab-sidecar').length === 1"
            " && document.querySelector('#jp-right-stack .jupyterlab-sidecar .gg-panel')"
        )
        page.wait_for_timeout(500)
        assert page.locator("#jp-right-stack .jupyterlab-sidecar").count() == 1 and tab.count() == 1

        # Closing the panel closes its tab.
        run_cell(page, "p.close()\nprint('@@1')")
        page.wait_for_function("() => !document.querySelector('#jp-right-stack .jupyterlab-sidecar')")
        assert tab.count() == 0


def test_sidebar_in_notebook7_shows_the_panel_in_the_cell(lab: dict[str, Any], browser: Any) -> None:
    """Notebook 7 has no side panel for it: the cell shows the whole panel, says why, and it works."""
    write_notebook(lab, "sidebar7.ipynb", SETUP + "gg.panel(m, sidebar=True)")
    with page_for(browser, "sidebar-notebook7") as page:
        open_notebook7(page, lab, "sidebar7.ipynb")
        run_all(page)
        panel = page.locator(".jp-OutputArea-output .gg-panel").first
        note = panel.locator(".gg-placement-note")
        note.wait_for()
        page.wait_for_timeout(1000)  # time for a side-panel view to appear, were there one
        assert page.locator(".jupyterlab-sidecar").count() == 0
        assert "gg-pointer" not in (panel.get_attribute("class") or "")
        assert "no side panel" in note.inner_text()
        assert panel.locator(".gg-devices-section").is_visible()
        panel.locator("tr.gg-model-row[data-model='pycode-tests'] button").click()
        page.wait_for_function(
            "() => document.querySelector(\".gg-panel tr.gg-model-row[data-model='pycode-tests'] button\").textContent === 'Current'"
        )
        shot(page, panel, "sidebar-notebook7.png")


def test_a_closed_managers_panel_in_jupyterlab(lab: dict[str, Any], browser: Any) -> None:
    """After ``m.close()`` the panel says the manager is closed, every control is off, devices idle."""
    write_notebook(lab, "closed.ipynb", SETUP + "gg.panel(m)")
    with page_for(browser, "closed") as page:
        open_notebook(page, lab, "closed.ipynb")
        wait_kernel_idle(lab, "closed.ipynb")
        run_all(page)
        panel = page.locator(f"{VISIBLE_NOTEBOOK} .jp-OutputArea-output .gg-panel").first
        panel.wait_for()
        controls = panel.locator("button, input, select, textarea")
        note = panel.locator(".gg-closed-note")
        switch = panel.locator("tr.gg-model-row[data-model='pycode-tests'] button")
        switch.wait_for()
        assert note.is_hidden() and switch.is_enabled()

        run_cell(page, "m.close()\nprint('@@1')")
        note.wait_for(state="visible")
        assert "closed" in note.inner_text()
        disabled = controls.evaluate_all("els => els.map(e => e.disabled)")
        assert len(disabled) > 10 and all(disabled), disabled
        statuses = panel.locator(".gg-device .gg-device-head .gg-badge").all_inner_texts()
        assert statuses == ["idle", "idle"], statuses
        assert panel.locator(".gg-resident-group").count() == 0
        ARTIFACTS.mkdir(exist_ok=True)
        shot(page, panel, "closed-panel.png")


def test_a_loading_row_fits_its_card_and_a_restarted_kernel_turns_the_panel_off(lab: dict[str, Any], browser: Any) -> None:
    """While a group loads, its row (name, member, badge, bar) stays inside its card with nothing
    overlapping, in a cell and at a side panel's width; once the kernel restarts, the panel says
    its manager is gone and every control is off, and nothing throws in the page."""
    write_notebook(lab, "restart.ipynb", SETUP + "gg.panel(m)")
    with page_for(browser, "restart") as page:
        thrown: list[str] = []
        page.on("pageerror", lambda error: thrown.append(str(error)))
        open_notebook(page, lab, "restart.ipynb")
        wait_kernel_idle(lab, "restart.ipynb")
        run_all(page)
        panel = page.locator(f"{VISIBLE_NOTEBOOK} .jp-OutputArea-output .gg-panel").first
        panel.locator("tr.gg-model-row[data-model='pycode-tests'] button").wait_for()
        # device 0 held by a `use` block: a load the panel asks for there shows its row at 0 % until released
        run_cell(page, "held = m.use('pycode-docs')\nheld.__enter__()\nprint('@@1')")
        panel.locator(".gg-catalog-section select").select_option("0")
        panel.locator("tr.gg-group-row[data-group='tinygpt2'] button[data-action='load_group']").click()
        row = panel.locator(".gg-device").first.locator(".gg-resident-group[data-group='tinygpt2']")
        row.locator(".gg-progress").wait_for()
        assert row.locator(".gg-badge").inner_text() == "loading 0%"
        # the panel's own request and the operation it started are one operation
        assert panel.locator(".gg-activity").inner_text() == "1 operation running…"
        ARTIFACTS.mkdir(exist_ok=True)
        shot(page, panel, "loading-row.png")
        assert panel_checks.row_problems(panel) == {"overlaps": [], "outside": []}
        found = panel_checks.at_width(page, panel, 250, ARTIFACTS / "loading-row-250px.png")
        assert (found["row_overlaps"], found["row_outside"], found["outside"]) == ([], [], []), found
        run_cell(page, "held.__exit__(None, None, None)\nprint('@@2')")
        row.locator(".gg-progress").wait_for(state="hidden")

        # restart the kernel as a person does: Kernel > Restart Kernel…, then confirm
        page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Kernel$")).click()
        page.locator(".lm-Menu-item[data-command='kernelmenu:restart']").click()
        page.locator(".jp-Dialog .jp-mod-accept").click()
        note = panel.locator(".gg-closed-note")
        note.wait_for(state="visible")
        assert "restarted or stopped" in note.inner_text()
        disabled = panel.locator("button, input, select, textarea").evaluate_all("els => els.map(e => e.disabled)")
        assert len(disabled) > 10 and all(disabled), disabled
        shot(page, panel, "kernel-gone-panel.png")
        assert thrown == []


LONG = "/checkpoints/" + "very-long-experiment-name-" * 4 + "step-120000"


def test_edges_a_person_hits_in_one_panel_shown_twice(lab: dict[str, Any], browser: Any) -> None:
    """One panel shown in two cells: each view takes only its own replies. Switch keeps the group
    where it is whatever "load on" says; Shift+Enter in a count field predicts (it does not re-run
    the cell), and junk there is refused inline; a group without an estimate says "size unknown";
    a long checkpoint id wraps instead of pushing the buttons out of the panel."""
    write_notebook(
        lab, "edges.ipynb",
        SETUP + f"m.register_group('broken', models={{{LONG!r}: '/nowhere/gone'}})\np = gg.panel(m)\np", "p",
    )
    with page_for(browser, "edges") as page:
        open_notebook(page, lab, "edges.ipynb")
        wait_kernel_idle(lab, "edges.ipynb")
        run_all(page)
        views = page.locator(f"{VISIBLE_NOTEBOOK} .jp-OutputArea-output .gg-panel")
        views.nth(1).locator("tr.gg-model-row[data-model='pycode-tests'] button").wait_for()
        a, b = views.nth(0), views.nth(1)
        assert panel_checks.layout_problems(a) == {"outside": [], "cut": [], "scrolls": False}
        found = panel_checks.at_width(page, a, 360, ARTIFACTS / "long-id-360px.png")
        assert (found["outside"], found["scrolls"]) == ([], False), found

        # Switch with "load on" naming the other device: a pointer change where the group is
        a.locator(".gg-catalog-section select").select_option("1")
        a.locator("tr.gg-model-row[data-model='pycode-tests'] button").click()
        page.wait_for_function(
            "() => document.querySelector(\".gg-panel tr.gg-model-row[data-model='pycode-tests'] button\").textContent === 'Current'"
        )
        where = run_cell(page, "print('@@' + json.dumps(next(g for g in m.groups() if g['id'] == 'pycode')['resident_on']))")
        assert where == [0]

        # a refused Predict in view A shows in A only
        a.locator("textarea.gg-prompt-input").fill("")
        a.locator("button.gg-run").click()
        a.locator(".gg-prompt-section .gg-error .gg-error-code", has_text="invalid_request").wait_for()
        page.wait_for_timeout(300)
        assert b.locator(".gg-error:not([hidden])").count() == 0

        # junk typed into "top", then Shift+Enter there: refused inline, and the cell is not run again
        prompts = page.locator(f"{VISIBLE_NOTEBOOK} .jp-InputPrompt").all_inner_texts()
        a.locator("textarea.gg-prompt-input").fill("def main(")
        top = a.locator("input.gg-num-predictions")
        top.fill("")
        top.press_sequentially("--3")
        top.press("Shift+Enter")
        error = a.locator(".gg-prompt-section .gg-error")
        error.locator(".gg-error-message", has_text="num_predictions").wait_for()
        assert page.locator(f"{VISIBLE_NOTEBOOK} .jp-InputPrompt").all_inner_texts() == prompts
        top.fill("4")
        top.press("Shift+Enter")
        page.wait_for_function("() => document.querySelectorAll('.gg-panel .gg-prediction').length === 4")
        assert b.locator(".gg-prediction").count() == 0  # B asked nothing

        # the broken group's member picked: its note says the size is unknown, not "~0 B"
        a.locator("select.gg-model-select").select_option(LONG)
        page.wait_for_timeout(200)
        assert "size unknown" in a.locator(".gg-model-note").inner_text()
        # its group taken out of the catalog: the picker follows the current member again
        run_cell(page, "m.unregister_group('broken')\nprint('@@1')")
        page.wait_for_function("() => document.querySelector('.gg-panel select.gg-model-select').value === 'pycode-tests'")
