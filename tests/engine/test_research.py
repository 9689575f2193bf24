"""Research access with real tiny models: ``m.run``, ``m.arun``, ``m.use``, and their holds."""

from __future__ import annotations

import asyncio
import signal
import threading
import warnings

import pytest
import torch

import gpugroups as gg
from gpugroups import protocol
from gpugroups.engine.devices import detect
from gpugroups.engine.worker import ThreadWorker
from gpugroups.errors import GpuGroupsError, HooksLeftWarning
from tests.waiting import wait_for

PROMPT = "def __init__(self"


def hidden(model, tokenizer, prompt: str = PROMPT) -> list[torch.Tensor]:
    """Every layer's hidden states of ``prompt``: what a researcher reads."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        return [h[0].cpu() for h in model(**enc, output_hidden_states=True).hidden_states]


def active(model, tokenizer) -> str | None:
    """The adapter PEFT applies now, None when adapters are off (the bare base) or absent."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [mod for mod in model.modules() if isinstance(mod, BaseTunerLayer)]
    return None if not layers or layers[0].disable_adapters else model.active_adapter


def group_status(m: gg.Manager, group_id: str) -> str:
    return next(g["status"] for g in m.groups() if g["id"] == group_id)


@pytest.fixture(scope="module")
def raw(tiny_llama, tiny_adapters, tiny_gpt2) -> dict[str, list[torch.Tensor]]:
    """Hidden states of every tiny member from models loaded by hand with transformers/PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = {"tiny-base": hidden(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tok)}
    for member, path in tiny_adapters.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        out[member] = hidden(PeftModel.from_pretrained(base, path).eval(), tok)
    gpt = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    out["tiny-gpt2"] = hidden(gpt, AutoTokenizer.from_pretrained(tiny_gpt2))
    assert not torch.allclose(out["tiny-a"][-1], out["tiny-b"][-1]), "the adapters must disagree for this to mean anything"
    return out


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_run_hidden_states_equal_models_loaded_by_hand(m, raw):
    with warnings.catch_warnings():  # transformers' own output-capturing hooks are no hooks left by fn
        warnings.simplefilter("error", HooksLeftWarning)
        for member in ("tiny-a", "tiny-base", "tiny-b", "tiny-gpt2"):
            assert_same(m.run(member, hidden), raw[member])
    assert m.run("tiny-b", active) == "tiny-b" and m.run("tiny-base", active) is None


def test_run_passes_arguments_and_arun_is_its_twin(m, raw):
    assert_same(m.run("tiny-a", hidden, "class Foo("), m.run("tiny-a", lambda model, tok: hidden(model, tok, "class Foo(")))
    assert_same(asyncio.run(m.arun("tiny-b", hidden, prompt=PROMPT)), raw["tiny-b"])


def test_run_leaves_process_and_current_member_unaffected(m):
    m.load("tiny-a")
    before = m.process("tiny-a", PROMPT, num_predictions=5)["predictions"]
    assert m.run("tiny-b", active) == "tiny-b"
    assert m.process("tiny-a", PROMPT, num_predictions=5)["predictions"] == before
    assert next(g for g in m.groups() if g["id"] == "tiny")["current_model"] == "tiny-a"


def test_what_research_code_changes_and_serving_relies_on_is_put_back(m):
    """Merged or disabled adapters, train mode, gradients, grad mode and generation settings left
    by a ``run`` or ``use`` do not change what the manager serves, nor the next research call."""
    members = ("tiny-base", "tiny-a", "tiny-b", "tiny-gpt2")

    def answers() -> dict[str, list[tuple[int, float, str]]]:
        """Each member's top 5 with continuations; log-probabilities to 4 places (merging an adapter
        into the base and out again moves the base weights by float rounding, ~1e-6)."""
        return {
            mid: [(p["token_id"], round(p["logprob"], 4), p["text"])
                  for p in m.process(mid, PROMPT, num_predictions=5, max_new_tokens=4)["predictions"]]
            for mid in members
        }

    before = answers()

    def meddle(model, tokenizer):
        model.merge_adapter()  # tiny-a's weights into the base
        model.generation_config.repetition_penalty = 5.0
        torch.set_grad_enabled(False)  # for this thread: the device's
        model.train()

    m.run("tiny-a", meddle)
    assert answers() == before
    m.run("tiny-b", lambda model, tokenizer: model.disable_adapter_layers())
    m.run("tiny-gpt2", lambda model, tokenizer: setattr(model, "generation_config", None))
    assert answers() == before
    with m.use("tiny-gpt2") as h:  # a single model's parameters take gradients
        enc = h.tokenizer(PROMPT, return_tensors="pt")
        h.model(**enc, labels=enc["input_ids"]).loss.backward()
        h.model.transformer.train()  # a part of the model: its dropout is on all the same
    assert answers() == before

    def left(model, tokenizer):
        training = any(mod.training for mod in model.modules())
        return torch.is_grad_enabled(), training, sum(p.grad is not None for p in model.parameters())

    assert m.run("tiny-gpt2", left) == (True, False, 0)  # grad mode back on, eval mode, no gradients kept
    assert m.run("tiny-a", left) == (True, False, 0)

    handles = []

    def steer(model, tokenizer):  # a hook is the way to change what is served on purpose: it stays, said
        handles.append(model.get_base_model().model.layers[0].mlp.register_forward_hook(lambda mod, i, o: o * 0))

    with pytest.warns(HooksLeftWarning, match="left 1 hook"):
        m.run("tiny-a", steer)
    assert answers()["tiny-b"] != before["tiny-b"]
    with pytest.warns(HooksLeftWarning, match=r"left 1 hook.*\(2 on its models now\)"):  # each time
        m.run("tiny-b", steer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # removing them is not worth a warning
        m.run("tiny-a", lambda model, tokenizer: [h.remove() for h in handles])
    assert answers() == before

    def everywhere(model, tokenizer):  # torch's global hook: on every module of every model
        handles.append(torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: o))

    with pytest.warns(HooksLeftWarning, match="left 1 hook"):
        m.run("tiny-a", everywhere)
    handles[-1].remove()


def test_use_hands_over_the_member_in_this_thread(m, raw):
    before = m.process("tiny-a", PROMPT, num_predictions=5)["predictions"]
    with m.use("tiny-b") as h:
        assert (h.model_id, h.group_id, h.device_id, h.device) == ("tiny-b", "tiny", 0, "cpu")
        assert active(h.model, h.tokenizer) == "tiny-b"
        assert_same(hidden(h.model, h.tokenizer), raw["tiny-b"])
        assert group_status(m, "tiny") == "in_use"
        assert m.state()["devices"][0]["status"] == "busy"
    with m.use("tiny-base") as h:
        assert active(h.model, h.tokenizer) is None
        assert_same(hidden(h.model, h.tokenizer), raw["tiny-base"])
    assert group_status(m, "tiny") == "resident"
    assert m.process("tiny-a", PROMPT, num_predictions=5)["predictions"] == before


def test_use_holds_the_worker_until_the_block_ends(m):
    m.load_group("gpt")
    done = threading.Event()
    with m.use("tiny-a"):
        t = threading.Thread(target=lambda: (m.process("tiny-gpt2", PROMPT), done.set()))
        t.start()
        assert not wait_for(done.is_set, timeout=0.5)  # another group, same device: waits
        with pytest.raises(GpuGroupsError) as e:  # from this thread it would wait forever
            m.process("tiny-gpt2", PROMPT)
        assert e.value.code == "conflict"
    t.join(30)
    assert done.is_set()


def test_run_function_calling_its_own_device_is_a_conflict_not_a_wedge(m):
    """``run``'s function runs on its device's worker: a call from it that would wait for that
    worker is refused; a state read, which waits for no worker, is answered."""
    m.load_group("gpt")

    def calls_in(model, tokenizer) -> tuple[int, str]:
        version = m.state()["version"]
        try:
            m.process("tiny-gpt2", PROMPT)
        except GpuGroupsError as exc:
            return version, exc.code
        return version, "answered"

    version, outcome = m.run("tiny-a", calls_in)
    assert version > 0 and outcome == "conflict"
    assert m.process("tiny-gpt2", PROMPT)["predictions"] and m.state()["devices"][0]["status"] == "idle"


def test_a_load_or_move_refused_from_a_use_block_or_run_changes_nothing(tiny_catalog_toml):
    """A call that would load onto (or move a group to) the device this thread holds is a
    ``conflict`` before anything is unloaded or reserved for it: the group was loaded or moved
    all the same, after the block, and stayed ``loading`` for other callers during it."""
    with gg.Manager(devices="virtual:2x512MiB", catalog=tiny_catalog_toml, progress=False) as m:
        m.load("tiny-a", device_id=0)
        m.load("tiny-gpt2", device_id=1)

        def placed() -> dict[str, tuple[str, list[int]]]:
            return {g["id"]: (g["status"], g["resident_on"]) for g in m.state()["groups"]}

        before = placed()

        def move(model, tokenizer) -> str:
            try:
                m.load("tiny-gpt2", device_id=0)
            except GpuGroupsError as exc:
                return exc.code
            return "moved"

        with m.use("tiny-a"):
            with pytest.raises(GpuGroupsError) as moving:
                m.load("tiny-gpt2", device_id=0)
            assert moving.value.code == "conflict"
            assert {k: v for k, v in placed().items() if k != "tiny"} == {k: v for k, v in before.items() if k != "tiny"}
        assert m.run("tiny-a", move) == "conflict"
        m.unload_group("gpt")
        with m.use("tiny-a"):  # a load placed on the held device
            with pytest.raises(GpuGroupsError) as loading:
                m.process("tiny-gpt2", PROMPT, device_id=0)
            assert loading.value.code == "conflict"
            assert placed()["gpt"] == ("unloaded", [])
        assert placed()["gpt"] == ("unloaded", []) and placed()["tiny"] == ("resident", [0])


def test_close_from_inside_use_or_run_is_a_conflict_and_changes_nothing(tiny_catalog_toml):
    """``close`` would wait for the block or the function it is called from: refused at once
    (it stalled 30 s, then said closed with the group still loaded), the manager open as it was."""

    def closes(model, tokenizer) -> str:
        try:
            m.close()
        except GpuGroupsError as exc:
            return exc.code
        return "closed"

    m = gg.Manager(devices="cpu", catalog=tiny_catalog_toml, progress=False)
    try:
        with m.use("tiny-a"), pytest.raises(GpuGroupsError) as inside:
            m.close()
        assert inside.value.code == "conflict"
        assert m.run("tiny-a", closes) == "conflict"
        assert not m.closed and group_status(m, "tiny") == "resident"
    finally:
        m.close()
    assert m.state()["closed"] and group_status(m, "tiny") == "unloaded"


class Boom(Exception):
    pass


def test_run_exception_reaches_the_caller_as_itself(m):
    def fail(model, tokenizer):
        raise Boom("from fn")

    with pytest.raises(Boom, match="from fn") as e:
        m.run("tiny-a", fail)
    assert any("device 0 (cpu)" in n for n in e.value.__notes__)
    assert group_status(m, "tiny") == "resident"
    assert m.run("tiny-a", active) == "tiny-a"  # the worker is healthy
    with pytest.raises(GpuGroupsError) as bad:
        m.run("tiny-a", "not callable")  # type: ignore[arg-type]
    assert bad.value.code == "invalid_request"


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_exception_or_interrupt_inside_use_releases_the_group(m, exc):
    with pytest.raises(exc), m.use("tiny-a"):
        raise exc()
    assert group_status(m, "tiny") == "resident"
    assert m.process("tiny-b", PROMPT)["predictions"]
    assert m.unload("tiny-a")["status"] == "unloaded"


def test_interrupt_while_use_waits_for_the_worker_releases_it(held):
    m, worker = held
    m.load("tiny-a")
    gate = worker.hold()
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def interrupt() -> None:
        wait_for(lambda: worker.queue_depth >= 2)  # the hold, then use's hand-over behind it
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt).start()
    try:
        with pytest.raises(KeyboardInterrupt), m.use("tiny-a"):
            pytest.fail("the block must not run")
    finally:
        gate.set()
    assert wait_for(lambda: group_status(m, "tiny") == "resident")
    assert m.process("tiny-a", PROMPT)["predictions"]


def test_unload_waits_for_use(m):
    result: list[dict] = []
    with m.use("tiny-a"):
        t = threading.Thread(target=lambda: result.append(m.unload("tiny-b")))
        t.start()
        assert not wait_for(lambda: bool(result), timeout=0.5)
        with pytest.raises(GpuGroupsError) as e:
            m.unload("tiny-a")
        assert e.value.code == "conflict"
    t.join(30)
    assert result[0]["status"] == "unloaded" and group_status(m, "tiny") == "unloaded"


def test_eviction_waits_for_use(tiny_catalog_toml):
    with gg.Manager(devices="virtual:1GiB", catalog=tiny_catalog_toml) as probe:
        sizes = {g["id"]: g["memory_estimate_bytes"] for g in probe.groups()}
    budget = max(sizes.values()) + min(sizes.values()) // 2  # room for either group, not both
    with gg.Manager(devices=f"virtual:{budget}B", catalog=tiny_catalog_toml) as m:
        result: list[dict] = []
        with m.use("tiny-a"):
            t = threading.Thread(target=lambda: result.append(m.load("tiny-gpt2")))
            t.start()
            assert not wait_for(lambda: bool(result), timeout=0.5)
            assert group_status(m, "tiny") == "in_use"
        t.join(30)
        assert result[0]["status"] == "loaded"
        assert m.state()["devices"][0]["resident_groups"] == ["gpt"]


def test_a_load_from_run_that_needs_the_room_run_holds_is_refused_not_a_wedge(tiny_catalog_toml):
    """The room is the group ``run`` holds, which cannot end while its function waits: answered at
    once with ``insufficient_memory`` (a caller elsewhere would wait for the hold), the device freed."""
    with gg.Manager(devices="virtual:1GiB", catalog=tiny_catalog_toml) as probe:
        sizes = {g["id"]: g["memory_estimate_bytes"] for g in probe.groups()}
    budget = max(sizes.values()) + min(sizes.values()) // 2  # room for either group, not both
    with gg.Manager(devices=f"virtual:{budget}B", catalog=tiny_catalog_toml) as m:
        def loads_gpt(model, tokenizer) -> str:
            try:
                return m.load_group("gpt")["status"]
            except GpuGroupsError as exc:
                return exc.code

        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(m.run("tiny-a", loads_gpt)), daemon=True)
        t.start()
        t.join(30)
        assert out == ["insufficient_memory"]
        assert group_status(m, "tiny") == "resident" and m.state()["devices"][0]["status"] == "idle"
        assert m.load_group("gpt")["status"] == "loaded"  # once run returned, the room is there


def test_a_group_in_use_is_never_the_eviction_victim(tiny_catalog_toml, tiny_gpt2):
    """Placement treats a group in use as busy: the idle group makes room, though it was used last."""
    with gg.Manager(devices="virtual:1GiB", catalog=tiny_catalog_toml) as probe:
        sizes = {g["id"]: g["memory_estimate_bytes"] for g in probe.groups()}
    budget = sizes["tiny"] + sizes["gpt"] + sizes["gpt"] // 2  # a second gpt-sized group needs an eviction
    with gg.Manager(devices=f"virtual:{budget}B", catalog=tiny_catalog_toml) as m:
        m.register_group("other", models={"other": str(tiny_gpt2)})
        m.load_group("tiny")
        m.load_group("gpt")
        result: list[dict] = []
        with m.use("tiny-a"):
            t = threading.Thread(target=lambda: result.append(m.load("other")))
            t.start()
            assert wait_for(lambda: group_status(m, "gpt") == "unloading")
            assert group_status(m, "tiny") == "in_use"
        t.join(30)
        assert result[0]["status"] == "loaded"
        assert sorted(m.state()["devices"][0]["resident_groups"]) == ["other", "tiny"]


class OutOfProcess(ThreadWorker):
    """A worker that says its models live in another process (the refusal path of ``use``)."""

    in_process = False


def test_use_on_an_out_of_process_worker_points_to_run(tiny_catalog_toml):
    with gg.Manager(devices="cpu", catalog=tiny_catalog_toml, worker=lambda d: OutOfProcess(d)) as m:
        with pytest.raises(GpuGroupsError) as e, m.use("tiny-a"):
            pytest.fail("the block must not run")
        assert e.value.code == "invalid_request" and "m.run(" in e.value.message
        assert group_status(m, "tiny") == "unloaded"  # refused before anything was loaded for it
        assert m.run("tiny-a", active) == "tiny-a"


def test_no_op_of_the_ops_table_reaches_research_access(m):
    research = {"run", "arun", "use"}
    assert not {op.manager_method for op in protocol.OPS.values()} & research
    assert not set(protocol.OPS) & research
    for name in research:
        with pytest.raises(GpuGroupsError) as e:
            protocol.dispatch(m, name, {"model_id": "tiny-a"})
        assert e.value.code == "invalid_request"


def test_worker_run_answers_a_group_not_loaded():
    w = ThreadWorker(detect("cpu")[0])
    try:
        with pytest.raises(GpuGroupsError):
            w.run("nothing", "m", lambda model, tok: None, (), {}).result(10)
    finally:
        w.stop()
