"""The panel in a real browser: Chromium driven by Playwright against a real JupyterLab.

Opens the quickstart, runs it, then works the panel like a person would (load a demo model,
switch member, type a prompt) and checks the predictions in the DOM against ``m.process`` run
in the same kernel. Also measures kernel-change -> DOM latency while another cell runs, checks
that a click is answered while another cell runs, and takes screenshots (light and dark theme)
into ``test-artifacts/``. The server is started with
``binder/jupyter_server_config.json`` as its config, so the Binder setup is exercised too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests import panel_checks
from tests.labdriver import (
    ARTIFACTS,
    CHROMIUM,
    cell_json,
    open_notebook,
    open_notebook7,
    page_for,
    run_all,
    run_cell,
    shot,
    start_cell,
    wait_kernel_idle,
    wait_notebook,
    write_notebook,
)

PROMPT = "def __init__(self"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"{CHROMIUM} is missing: install it with `apt-get install -y --no-install-recommends chromium`",
    ),
]


def test_command_one_opens_the_quickstart_with_nothing_to_dismiss(lab: dict[str, Any], browser: Any) -> None:
    """The URL the server prints opens the quickstart as the only, active tab; no dialog, no toast."""
    printed = re.search(r"http://127\.0\.0\.1:\d+(/\S*)\?token=", lab["log"].read_text())
    assert printed and printed[1] == "/lab/tree/quickstart.ipynb", printed
    with page_for(browser, "command-one") as page:
        page.goto(f"{lab['url']}{printed[1]}?token={lab['token']}")
        wait_notebook(page)
        page.wait_for_timeout(2000)  # time for a news question or an update toast to pop up, if any
        shot(page, page.locator("#jp-main-dock-panel"), "command-one.png")
        tabs = page.locator("#jp-main-dock-panel .lm-TabBar-tab")
        assert tabs.all_inner_texts() == ["quickstart.ipynb"]
        assert "lm-mod-current" in (tabs.first.get_attribute("class") or "")
        assert page.locator(".jp-Dialog").count() == 0
        toasts = page.locator(".Toastify__toast")
        assert toasts.count() == 0, toasts.all_inner_texts()


def test_quickstart_panel_in_jupyterlab(lab: dict[str, Any], browser: Any) -> None:
    with page_for(browser, "quickstart") as page:
        open_notebook(page, lab, "quickstart.ipynb")
        _drive_quickstart(page)


def _drive_quickstart(page: Any) -> None:
    run_all(page)
    panel = page.locator(".jp-OutputArea-output .gg-panel").first
    panel.wait_for()
    # The tour is done when its last cell has printed its closing line.
    page.get_by_text("End of the tour.").wait_for(timeout=120_000)
    page.wait_for_function(
        "() => !document.querySelector('.jp-InputPrompt') || ![...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].some(e => e.textContent.includes('*'))"
    )
    shot(page, panel, "quickstart-panel.png")
    # The REST part ran against this server (its extension enabled by binder's config).
    rest = page.locator(".jp-OutputArea-output", has_text="over REST").first.inner_text()
    assert "state version over REST:" in rest and "REST call failed" not in rest, rest

    # Unload the adapters group, then load its base by clicking, like a person would.
    group = panel.locator("tr.gg-group-row[data-group='pycode']")
    if group.locator("button[data-action='unload_group']").is_enabled():
        group.locator("button[data-action='unload_group']").click()
    page.wait_for_function(
        "() => document.querySelector(\".gg-panel tr.gg-group-row[data-group='pycode'] .gg-resident-on\").textContent === '—'"
    )
    outputs = page.locator(".jp-OutputArea-output").count()
    base = panel.locator("tr.gg-model-row[data-model='pycode-base'] button")
    base.click()
    page.wait_for_function(
        "() => document.querySelector(\".gg-panel tr.gg-model-row[data-model='pycode-base'] button\").textContent === 'Current'"
    )
    # A load from the panel prints nothing into any cell (no progress bars, no warnings).
    assert page.locator(".jp-OutputArea-output").count() == outputs

    # Pick another member: it becomes current at once, and the panel says so.
    panel.locator("select.gg-model-select").select_option("pycode-tests")
    page.wait_for_function(
        "() => document.querySelector(\".gg-panel tr.gg-model-row[data-model='pycode-tests'] button\").textContent === 'Current'"
    )
    assert "switched in" in panel.locator(".gg-model-note").inner_text()

    panel.locator("textarea.gg-prompt-input").fill(PROMPT)
    panel.locator("input.gg-num-predictions").fill("5")
    panel.locator("button.gg-run").click()
    page.wait_for_function(
        "() => document.querySelectorAll('.gg-panel .gg-prediction').length === 5 && document.querySelector('.gg-panel .gg-result-meta').textContent.startsWith('pycode-tests')"
    )
    in_dom = panel.locator(".gg-prediction").evaluate_all(
        "rows => rows.map(r => [r.dataset.token, Number(r.dataset.probability)])"
    )
    shot(page, panel.locator(".gg-predictions"), "quickstart-predictions.png")

    in_python = run_cell(
        page,
        "import json\n"
        f"_r = m.process('pycode-tests', {PROMPT!r}, num_predictions=5)\n"
        "print('@@' + json.dumps([[p['token'], p['probability']] for p in _r['predictions']]))",
    )
    assert [t for t, _ in in_dom] == [t for t, _ in in_python]
    assert [round(p, 5) for _, p in in_dom] == [round(p, 5) for _, p in in_python]

    # A refused request shows inline as code + message, and nothing lands in any cell.
    outputs = page.locator(".jp-OutputArea-output").count()
    panel.locator("input.gg-num-predictions").fill("0")
    panel.locator("button.gg-run").click()
    error = panel.locator(".gg-prompt-section .gg-error")
    error.locator(".gg-error-code", has_text="invalid_request").wait_for()
    assert "num_predictions" in error.locator(".gg-error-message").inner_text()
    shot(page, error, "quickstart-error.png")
    assert page.locator(".jp-OutputArea-output").count() == outputs

    _measure_live_updates(page)
    _click_while_a_cell_runs(page, panel, "pycode-docs")

    # Readable in both themes, from a 360 px side panel to full width; the error line is shown.
    assert error.is_visible()
    _check_readable(page, panel, "light")
    # Dark theme: the same panel through JupyterLab's own theme switch.
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Settings$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Theme$")).hover()
    page.get_by_role("menuitem", name="JupyterLab Dark", exact=True).click()
    page.wait_for_selector("body[data-jp-theme-light='false']", state="attached")
    page.wait_for_timeout(300)  # the theme's stylesheet swaps in after the attribute flips
    shot(page, panel, "quickstart-panel-dark.png")
    _check_readable(page, panel, "dark")


def _check_readable(page: Any, panel: Any, theme: str) -> None:
    """Every text meets WCAG AA contrast, and nothing overflows or cuts a name at 360 px."""
    bad = panel_checks.low_contrast(panel)
    assert not bad, f"{theme} theme, under {panel_checks.MIN_CONTRAST}:1: {bad}"
    ARTIFACTS.mkdir(exist_ok=True)
    for width in (360, 600):
        found = panel_checks.at_width(page, panel, width, ARTIFACTS / f"panel-{width}px-{theme}.png")
        assert found == {"outside": [], "cut": [], "scrolls": False, "row_overlaps": [], "row_outside": []}, (
            f"{width} px, {theme}: {found}"
        )


def _measure_live_updates(page: Any) -> None:
    """Flip a pin from a background thread while the cell sleeps; time each change to the DOM."""
    page.evaluate(
        """() => {
            window.__ggSeen = [];
            const button = document.querySelector(".gg-panel tr.gg-group-row[data-group='pycode'] button[data-action='pin']");
            new MutationObserver(() => window.__ggSeen.push([Date.now(), button.textContent]))
                .observe(button, {childList: true, characterData: true, subtree: true});
        }"""
    )
    marks = run_cell(
        page,
        "import json, threading, time\n"
        "_marks = []\n"
        "def _flip():\n"
        "    for i in range(6):\n"
        "        time.sleep(0.25)\n"
        "        _marks.append(time.time() * 1000)\n"
        "        m.pin('pycode') if i % 2 == 0 else m.unpin('pycode')\n"
        "_t = threading.Thread(target=_flip)\n"
        "_t.start(); time.sleep(2.0); _t.join()\n"
        "print('@@' + json.dumps([_marks, time.time() * 1000]))",
    )
    flips, cell_end = marks
    seen = page.evaluate("() => window.__ggSeen")
    assert [text for _, text in seen] == ["Unpin", "Pin"] * 3
    latencies = [t - mark for (t, _), mark in zip(seen, flips)]
    print(f"kernel change -> DOM latency (ms): {[round(x, 1) for x in latencies]}")
    (ARTIFACTS / "latency.json").write_text(json.dumps({"latencies_ms": latencies}))
    # Every update reached the page while the cell was still running.
    assert all(t < cell_end for t, _ in seen)


def _click_while_a_cell_runs(page: Any, panel: Any, model: str) -> None:
    """A click that makes ``model`` current is answered while another cell of the kernel runs."""
    cell = start_cell(page, "import json, time\ntime.sleep(8)\nprint('@@' + json.dumps(time.time() * 1000))")
    cell.locator(".jp-InputPrompt", has_text="*").wait_for()
    panel.locator(f"tr.gg-model-row[data-model='{model}'] button").click()
    page.wait_for_function(
        f"() => document.querySelector(\".gg-panel tr.gg-model-row[data-model='{model}'] button\").textContent === 'Current'"
    )
    switched = page.evaluate("() => Date.now()")
    assert switched < cell_json(cell), "the switch waited for the running cell"


def test_panel_in_notebook7(lab: dict[str, Any], browser: Any) -> None:
    """The same widget in Notebook 7: it renders, a click loads, a prompt predicts as ``process`` does."""
    write_notebook(
        lab,
        "nb7.ipynb",
        "import gpugroups as gg\nm = gg.Manager(devices='virtual:2x256MiB')\nm.load('pycode-docs')\ngg.panel(m)",
    )
    with page_for(browser, "notebook7") as page:
        open_notebook7(page, lab, "nb7.ipynb")
        run_all(page)
        panel = page.locator(".jp-OutputArea-output .gg-panel").first
        panel.wait_for()
        wait_kernel_idle(lab, "nb7.ipynb")
        # The very first click (a switch to another member), while another cell runs: it goes
        # to the subshell Notebook 7 sends widget messages on, not behind the cell.
        _click_while_a_cell_runs(page, panel, "pycode-base")
        panel.locator("tr.gg-model-row[data-model='tinygpt2'] button").click()
        page.wait_for_function(
            "() => document.querySelector(\".gg-panel tr.gg-model-row[data-model='tinygpt2'] button\").textContent === 'Current'"
        )
        panel.locator("select.gg-model-select").select_option("tinygpt2")
        panel.locator("textarea.gg-prompt-input").fill(PROMPT)
        panel.locator("input.gg-num-predictions").fill("3")
        panel.locator("button.gg-run").click()
        page.wait_for_function("() => document.querySelectorAll('.gg-panel .gg-prediction').length === 3")
        in_dom = panel.locator(".gg-prediction").evaluate_all("rows => rows.map(r => r.dataset.token)")
        shot(page, panel, "notebook7-panel.png")
        in_python = run_cell(
            page,
            "import json\n"
            f"print('@@' + json.dumps([p['token'] for p in m.process('tinygpt2', {PROMPT!r}, num_predictions=3)['predictions']]))",
        )
        assert in_dom == in_python


def test_sharded_group_and_ray_devices_in_the_panel(lab: dict[str, Any], browser: Any) -> None:
    """A group sharded over three devices shows on each card with its part; then the same panel
    given a hand-made Ray state groups cards by node, shows a lost device and an in-use group; a
    group that cannot be estimated shows no estimate; Clear is off where every group is pinned."""
    write_notebook(
        lab,
        "sharded.ipynb",
        "import copy, json\nimport gpugroups as gg\nbig = gg.Manager(devices='virtual:3x128MiB')\n"
        "big.load('pycode-tests', device_ids=[0, 1, 2])\nbig.register_group('broken', models={'gone': '/nowhere/gone'})\n"
        "p = gg.panel(big)\np",
    )
    with page_for(browser, "sharded") as page:
        open_notebook(page, lab, "sharded.ipynb")
        # the status bar may still show the other open notebook's idle kernel: ask the server
        wait_kernel_idle(lab, "sharded.ipynb")
        run_all(page)
        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output .gg-panel").first
        panel.wait_for()
        row = panel.locator("tr.gg-group-row[data-group='pycode'] .gg-resident-on")
        page.wait_for_function(
            "() => document.querySelector(\".gg-panel tr.gg-group-row[data-group='pycode'] .gg-resident-on\")?.textContent === 'dev 0+1+2'"
        )
        shards = run_cell(page, "print('@@' + json.dumps(next(g for g in big.groups() if g['id'] == 'pycode')['shards']))")
        assert [s["device_id"] for s in shards] == [0, 1, 2], shards
        shown = panel.locator(".gg-device .gg-resident-group[data-group='pycode']").evaluate_all(
            "lis => lis.map(li => [li.closest('.gg-device').dataset.deviceId, Number(li.dataset.shareBytes),"
            " li.querySelector('.gg-resident-share').textContent])"
        )
        assert [(int(d), b) for d, b, _ in shown] == [(s["device_id"], s["bytes"]) for s in shards]
        assert [text.split(" · ")[0] for _, _, text in shown] == ["part 1/3", "part 2/3", "part 3/3"]
        shot(page, panel, "sharded-panel.png")
        # a group whose files cannot be read has no estimate, and does not claim "0 B"
        broken = panel.locator("tr.gg-group-row[data-group='broken'] .gg-estimate")
        assert broken.inner_text() == "—" and "could not be read" in (broken.get_attribute("title") or "")

        # The same panel fed a Ray-like state: two nodes, device 2 lost, the group held by a run.
        run_cell(
            page,
            "s = copy.deepcopy(big.state())\n"
            "for d, n in zip(s['devices'], ['a1b2c3d4e5', 'a1b2c3d4e5', 'f6f7f8f9f0']):\n"
            "    d['node'], d['host'] = n, '10.0.0.' + str(ord(n[0]) % 10)\n"
            "s['devices'][2]['status'] = 'lost'\n"
            "next(g for g in s['groups'] if g['id'] == 'pycode')['status'] = 'in_use'\n"
            "s['version'] += 1\np.state = s\nprint('@@1')",
        )
        page.wait_for_function("() => document.querySelectorAll('.gg-panel .gg-node').length === 2")
        layout = panel.locator(".gg-devices > *").evaluate_all(
            "els => els.map(e => e.classList.contains('gg-node') ? 'node ' + e.dataset.node : 'dev ' + e.dataset.deviceId)"
        )
        assert layout == ["node a1b2c3d4e5", "dev 0", "dev 1", "node f6f7f8f9f0", "dev 2"]
        assert "10.0.0.7" in panel.locator(".gg-node").first.inner_text()
        lost = panel.locator(".gg-device[data-device-id='2']")
        assert "gg-lost" in (lost.get_attribute("class") or "")
        assert lost.locator(".gg-device-head .gg-badge").inner_text() == "lost"
        assert lost.locator("button[data-action='clear_device']").is_disabled()
        assert panel.locator(".gg-device[data-device-id='0'] button[data-action='clear_device']").is_enabled()
        assert panel.locator("select.gg-device-select option[value='2']").is_disabled()
        assert row.inner_text() == "dev 0+1+2 · in use"
        assert panel.locator(".gg-resident-group[data-group='pycode'] .gg-badge").first.inner_text() == "in use"
        shot(page, panel, "ray-panel.png")
        _check_readable(page, panel, "sharded")
        # every group on device 0 pinned: nothing for its Clear to do, and its tooltip says why
        run_cell(
            page,
            "s = copy.deepcopy(s)  # a new value: the trait sends only a changed one\n"
            "next(g for g in s['groups'] if g['id'] == 'pycode')['pinned'] = True\n"
            "s['version'] += 1\np.state = s\nprint('@@1')",
        )
        clear = panel.locator(".gg-device[data-device-id='0'] button[data-action='clear_device']")
        clear.wait_for()
        page.wait_for_function(
            "() => document.querySelector(\".gg-panel .gg-device[data-device-id='0'] button[data-action='clear_device']\").disabled"
        )
        assert "pinned" in (clear.get_attribute("title") or "")
        run_cell(page, "big.close()\nprint('@@1')")
