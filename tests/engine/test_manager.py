"""The Manager facade with real tiny models: load, switch, process, twins, failures, bad input."""

from __future__ import annotations

import asyncio
import shutil
import threading

import pytest
import torch

import gpugroups as gg
from gpugroups.errors import GpuGroupsError
from gpugroups.protocol import MAX_NEW_TOKENS, MAX_NUM_PREDICTIONS
from tests.waiting import wait_for

PROMPT = "def __init__(self"


def raw_top(model, tokenizer, prompt: str, k: int):
    """Top-k (ids, logprobs) straight from the transformers/PEFT model: the reference."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits[0, -1].float()
    lp = torch.log_softmax(logits, -1)
    vals, ids = torch.topk(lp, k)
    return ids.tolist(), vals.tolist()


def test_load_process_matches_raw_models(m, tiny_llama, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = m.load("tiny-a")
    assert out["status"] == "loaded" and out["group_id"] == "tiny" and out["device_id"] == 0
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ref_base = raw_top(base, tok, PROMPT, 5)
    peft = PeftModel.from_pretrained(base, tiny_adapters["tiny-a"], adapter_name="tiny-a").eval()
    peft.load_adapter(tiny_adapters["tiny-b"], adapter_name="tiny-b")
    refs = {}
    for member in ("tiny-a", "tiny-b"):
        peft.set_adapter(member)
        refs[member] = raw_top(peft, tok, PROMPT, 5)
    refs["tiny-base"] = ref_base
    assert refs["tiny-a"][0] != refs["tiny-b"][0], "the two adapters must disagree for this test to mean anything"
    for member, (ids, lps) in refs.items():
        res = m.process(member, PROMPT, num_predictions=5)
        assert [p["token_id"] for p in res["predictions"]] == ids
        assert [p["logprob"] for p in res["predictions"]] == pytest.approx(lps, abs=1e-5)
        assert res["predictions"][0]["token"] == tok.decode([ids[0]])
        probs = [p["probability"] for p in res["predictions"]]
        assert probs == sorted(probs, reverse=True)


def test_switch_member_is_instant_and_needs_no_memory(m):
    m.load("tiny-a")
    before = m.state()
    used = before["devices"][0]["memory"]["manager_bytes"]
    out = m.load("tiny-b")
    after = m.state()
    assert out["status"] == "switched"
    assert m.load("tiny-b")["status"] == "already_loaded"
    assert after["devices"][0]["memory"]["manager_bytes"] == used
    assert after["devices"][0]["current_group"]["model"] == "tiny-b"
    assert after["version"] > before["version"]
    assert m.process("tiny-b", PROMPT)["predictions"] != m.process("tiny-a", PROMPT)["predictions"]


def test_same_group_requested_concurrently_is_loaded_once(m):
    outs: list = []
    threads = [threading.Thread(target=lambda mid=mid: outs.append(m.load(mid))) for mid in ("tiny-a", "tiny-b", "tiny-base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = sorted(o["status"] for o in outs)
    assert statuses.count("loaded") == 1 and set(statuses) <= {"loaded", "switched", "already_loaded"}
    assert m.state()["devices"][0]["resident_groups"] == ["tiny"]


def test_process_waits_for_a_load_in_progress(held):
    m, worker = held
    gate = worker.hold()  # the load stays in progress until the gate opens
    loader = threading.Thread(target=m.load, args=("tiny-a",))
    loader.start()
    assert wait_for(lambda: m.state()["operations"])
    result: dict = {}
    proc = threading.Thread(target=lambda: result.update(m.process("tiny-a", PROMPT)))
    proc.start()
    gate.set()
    proc.join(60)
    loader.join(60)
    assert len(result["predictions"]) == 3


def test_continuations(m):
    res = m.process("tiny-base", PROMPT, num_predictions=2, max_new_tokens=4)
    for p in res["predictions"]:
        assert p["text"].startswith(p["token"]) and len(p["text"]) >= len(p["token"])


def test_failed_load_rolls_back(tmp_path, tiny_llama, models_root):
    broken = models_root / "broken-llama"
    shutil.copytree(tiny_llama, broken, dirs_exist_ok=True)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    mgr = gg.Manager(devices="virtual:2x64MiB", catalog=[{"group_id": "broken", "models": {"broken": str(broken)}}])
    try:
        before = mgr.state()["devices"]
        with pytest.raises(GpuGroupsError) as e:
            mgr.load("broken")
        assert e.value.code in ("load_failed", "invalid_model")
        s = mgr.state()
        assert s["operations"] == [] and all(d["resident_groups"] == [] for d in s["devices"])
        assert [d["memory"] for d in s["devices"]] == [d["memory"] for d in before]
        assert mgr.state()["groups"][0]["status"] == "unloaded"
    finally:
        mgr.close()


@pytest.mark.parametrize(
    "call, code",
    [
        (lambda m: m.load("no-such-model"), "unknown_model"),
        (lambda m: m.load("/etc"), "unknown_model"),
        (lambda m: m.load_group("no-such-group"), "unknown_group"),
        (lambda m: m.load("tiny-a", device_id=7), "unknown_device"),
        (lambda m: m.clear_device(-1), "invalid_request"),
        (lambda m: m.load("tiny-a", device_id="0"), "invalid_request"),
        (lambda m: m.process("tiny-a", ""), "invalid_request"),
        (lambda m: m.process("tiny-a", PROMPT, num_predictions=-2), "invalid_request"),
        (lambda m: m.process("tiny-a", PROMPT, num_predictions="3"), "invalid_request"),
        (lambda m: m.process("tiny-a", PROMPT, max_new_tokens=-1), "invalid_request"),
        (lambda m: m.process("nope", PROMPT), "unknown_model"),
        (lambda m: m.pin("tiny", pinned="false"), "invalid_request"),
        (lambda m: m.subscribe(5), "invalid_request"),
        (lambda m: m.register_group("zz", models=5), "invalid_catalog"),
        (lambda m: m.register_group("zz", models={"a": 5}), "invalid_catalog"),
        (lambda m: m.register_group("zz", models=["a"], adapters={"b": "c"}), "invalid_catalog"),
    ],
)
def test_bad_input_is_a_clear_error(m, call, code):
    with pytest.raises(GpuGroupsError) as e:
        call(m)
    assert e.value.code == code and e.value.message
    assert m.state()["operations"] == []


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({"dtype": "int8"}, "invalid_request"),
        ({"devices": None}, "invalid_request"),
        ({"devices": 5}, "invalid_request"),
        ({"devices": "virtual:100000x1MiB"}, "invalid_request"),
        ({"devices": ["virtual:3000x1MiB", "virtual:3000x1MiB"]}, "invalid_request"),
        ({"worker": "nope"}, "invalid_request"),
        ({"progress": "yes"}, "invalid_request"),
        ({"catalog": 5}, "invalid_catalog"),
        ({"catalog": [{"group_id": "x", "models": ["m"], "bogus": 1}]}, "invalid_catalog"),
    ],
)
def test_bad_manager_options_are_clear_errors_and_start_nothing(kwargs, code):
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(GpuGroupsError) as e:
        gg.Manager(**{"devices": "virtual:1x100MiB", **kwargs})
    assert e.value.code == code and e.value.message
    assert [t.name for t in threading.enumerate() if t.ident not in before] == []


def test_a_null_count_means_its_default(m):
    assert len(m.process("tiny-a", PROMPT, num_predictions=None, max_new_tokens=None)["predictions"]) == 3


def test_huge_counts_are_capped_and_said_but_not_truncated(m):
    """One rule for both counts: lowered to the cap with a note; ``truncated`` is about the prompt only."""
    res = m.process("tiny-a", PROMPT, num_predictions=10_000)
    assert len(res["predictions"]) == MAX_NUM_PREDICTIONS
    assert res["notes"] == [f"num_predictions 10000 capped at {MAX_NUM_PREDICTIONS}"]
    assert res["truncated"] is False
    res = m.process("tiny-base", PROMPT, num_predictions=1, max_new_tokens=10_000)
    assert res["notes"] == [f"max_new_tokens 10000 capped at {MAX_NEW_TOKENS}"]
    assert res["truncated"] is False and res["predictions"][0]["text"]


def test_long_prompt_gives_no_misleading_indexing_warning(m, caplog, capsys):
    """transformers warns a too-long prompt "will result in indexing errors"; gpugroups cuts it, so
    that warning must not reach the user (it is logged, hence caplog, or printed)."""
    m.load("tiny-base")
    with caplog.at_level("WARNING"):
        res = m.process("tiny-base", "x = 1\n" * 2000)
    assert res["truncated"]
    out = capsys.readouterr()
    shown = caplog.text + out.out + out.err
    assert "indexing errors" not in shown and "sequence length is longer" not in shown


def test_long_prompt_is_truncated_from_the_left_and_said(m):
    res = m.process("tiny-base", "x = 1\n" * 2000)
    assert res["truncated"] and res["prompt_tokens"] == 512 and res["notes"]
    short = m.process("tiny-base", PROMPT)
    assert not short["truncated"] and short["notes"] == []


def test_async_twins(m):
    async def go():
        out = await m.aload("tiny-a")
        res = await m.aprocess("tiny-a", PROMPT, num_predictions=2)
        return out, res

    out, res = asyncio.run(go())
    assert out["status"] == "loaded" and len(res["predictions"]) == 2


def test_default_manager_is_one_per_process():
    assert gg.manager() is gg.manager()
    with pytest.raises(GpuGroupsError):
        gg.manager(devices="cpu")


def test_unload_really_frees_the_models(held):
    import gc
    import weakref

    m, worker = held
    m.load("tiny-a")
    m.process("tiny-a", PROMPT)
    runtime = worker.runtimes()["tiny"]
    refs = [weakref.ref(member.model) for member in runtime.members.values()]
    del runtime
    m.unload("tiny-a")
    gc.collect()
    assert all(r() is None for r in refs), "a model outlived its unload"
    assert m.state()["devices"][0]["memory"]["manager_bytes"] == 0


def test_discover_lists_loadable_ungrouped_models(models_root, tiny_llama, tiny_gpt2, tmp_path):
    from gpugroups.catalog import Catalog

    extra = tmp_path / "my-model"
    shutil.copytree(tiny_gpt2, extra)
    cat = Catalog(roots=[tmp_path, models_root])
    cat.register_group("gpt", models={"tiny-gpt2": str(tiny_gpt2)})
    with gg.Manager(devices="cpu", catalog=cat) as mgr:
        found = mgr.discover()
        assert str(extra) in found and str(tiny_llama) in found
        assert str(tiny_gpt2) not in found, "a grouped model is not offered again"
        assert mgr.load(str(extra))["group_id"] == f"single:{extra}"
        assert str(extra) not in mgr.discover()


def test_a_group_registered_wrong_is_taken_out_and_registered_again(
    tiny_catalog_toml, tiny_gpt2, tiny_llama, tiny_adapters
):
    """Adapters registered on the wrong base fail to load; ``unregister_group`` takes the group
    out (refused while it is loaded or pinned), and the same id registers again, fixed."""
    with gg.Manager(devices="cpu", catalog=tiny_catalog_toml, progress=False) as m:
        adapter = str(tiny_adapters["tiny-a"])
        m.register_group("mine", base=str(tiny_gpt2), base_id="mine-base", adapters={"mine-a": adapter})
        with pytest.raises(GpuGroupsError) as failed:
            m.load("mine-a")
        assert failed.value.code in ("invalid_model", "load_failed")
        with pytest.raises(GpuGroupsError) as again:  # the id is taken until it is taken out
            m.register_group("mine", base=str(tiny_llama), base_id="mine-base", adapters={"mine-a": adapter})
        assert again.value.code == "invalid_catalog"
        assert m.unregister_group("mine")["id"] == "mine"
        assert "mine" not in {g["id"] for g in m.groups()} and "mine-a" not in {x["id"] for x in m.models()}
        m.register_group("mine", base=str(tiny_llama), base_id="mine-base", adapters={"mine-a": adapter})
        assert m.process("mine-a", PROMPT)["predictions"]
        m.pin("mine")
        for gid, code in (("mine", "conflict"), ("nothing", "unknown_group")):
            with pytest.raises(GpuGroupsError) as refused:
                m.unregister_group(gid)
            assert refused.value.code == code
        m.unload_group("mine")
        m.unregister_group("mine")
        with pytest.raises(GpuGroupsError) as gone:
            m.load("mine-a")
        assert gone.value.code == "unknown_model"
