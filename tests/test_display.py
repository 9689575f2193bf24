"""Rich display: a Manager and a process result render as HTML tables; the result stays a plain dict."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

import gpugroups as gg
from gpugroups.display import RichProcessResult, manager_html, process_html


@pytest.fixture(scope="module")
def m(tiny_catalog_toml: Path) -> Any:
    manager = gg.Manager(devices="virtual:2x512MiB", catalog=tiny_catalog_toml)
    yield manager
    manager.close()


def test_process_result_is_a_plain_dict_with_an_html_table(m: Any) -> None:
    result = m.process("tiny-a", "hello world", num_predictions=4, max_new_tokens=2)
    assert isinstance(result, dict) and isinstance(result, RichProcessResult)
    plain = dict(result)
    assert json.dumps(result) == json.dumps(plain)
    assert json.loads(json.dumps(result)) == plain
    assert repr(result) == repr(plain)  # plain text where HTML is not shown
    html = result._repr_html_()
    assert html.count("<tr>") == 1 + 4  # the head and one row per prediction
    widths = [float(w) for w in re.findall(r"width:([\d.]+)%", html)]
    assert widths == [round(100 * p["probability"], 1) for p in result["predictions"]]
    assert "continuation" in html and "dev 0" in html and "tiny-a" in html


def test_tokens_and_prompt_are_escaped() -> None:
    result = {
        "model_id": "m", "group_id": "g", "device_id": 0, "device_ids": [0, 1], "prompt": "a < b && <script>",
        "predictions": [{"token": "<b>&", "token_id": 1, "probability": 0.75, "logprob": -0.29, "text": "</td>"}],
        "prompt_tokens": 5, "truncated": True, "notes": ["<capped>"], "timing": {"batch_size": 1},
    }
    html = process_html(result)
    assert "<b>&" not in html and "<script>" not in html and "</td>\"" not in html and "<capped>" not in html
    assert "&quot;&lt;b&gt;&amp;&quot;" in html and "&lt;script&gt;" in html and "&lt;capped&gt;" in html
    assert "on dev 0+1" in html and "truncated" in html and "width:75.0%" in html


def test_manager_html_shows_devices_groups_and_a_sharded_groups_parts(m: Any) -> None:
    m.load_group("gpt", device_id=1)
    html = m._repr_html_()
    assert "gpugroups.Manager" in html and "virtual:1" in html
    assert re.search(r"<td[^>]*>gpt</td>.*?<td[^>]*>dev 1</td>", html)
    # A sharded group as the state shows it: its span and each device's part.
    state = copy.deepcopy(m.state())
    gpt = next(g for g in state["groups"] if g["id"] == "gpt")
    gpt.update(resident_on=[0, 1], shards=[{"device_id": 0, "bytes": 3 << 20}, {"device_id": 1, "bytes": 5 << 20}])
    state["devices"][0]["resident_groups"] = ["gpt"]
    state["devices"][0].update(node="abcdef0123456789", host="10.1.2.3", status="lost")
    html = manager_html(state)
    assert "dev 0+1" in html and "gpt (3.0 MiB part)" in html and "gpt (5.0 MiB part)" in html
    assert "abcdef01 10.1.2.3" in html and ">lost<" in html


def test_closed_manager_says_so(tiny_catalog_toml: Path) -> None:
    own = gg.Manager(devices="virtual:1x512MiB", catalog=tiny_catalog_toml)
    assert "closed" not in own._repr_html_()
    own.close()
    assert "<b>closed</b>" in own._repr_html_()
