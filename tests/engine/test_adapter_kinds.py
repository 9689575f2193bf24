"""Adapters of every PEFT kind a user brings answer alone and in a batch exactly as alone, and a
failed mixed pass leaves the group working.

PEFT mixes rows of plain LoRA adapters only: DoRA it refuses (and leaves its row hooks on the
model, so every later pass failed), ``modules_to_save`` that one adapter lacks it fails on, and
for IA3, prefix and prompt tuning it ignores the rows' adapters and answered every row with the
active one. Prompt tuning also answered a padded row differently from the same prompt alone.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.engine.devices import detect
from gpugroups.engine.runtime import Runtime
from tests.tinymodels import build_lora_adapter, build_peft_adapter

PROMPTS = ("def main(", "class Tree(object):\n    def walk(self")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    root = tmp_path_factory.mktemp("adapter-kinds")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    configs = {
        "dora": LoraConfig(**lora, use_dora=True),
        "saved-head": LoraConfig(**lora, modules_to_save=["lm_head"]),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "prompt": PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }
    out = {name: build_peft_adapter(root / name, tiny_llama, seed, config) for seed, (name, config) in enumerate(configs.items())}
    out["plain"] = build_lora_adapter(root / "plain", tiny_llama, seed=11)
    return out


def _answer(m: gg.Manager, member: str, prompt: str) -> dict:
    return m.process(member, prompt, num_predictions=3)


def _key(answer: dict) -> list[tuple[int, float]]:
    return [(p["token_id"], round(p["probability"], 5)) for p in answer["predictions"]]


@pytest.mark.parametrize(
    ("adapters", "mix"),
    [(("dora", "plain"), False), (("saved-head", "plain"), False), (("ia3",), False), (("prefix",), False),
     (("prompt",), False), (("plain",), True)],
)
def test_members_asked_together_answer_as_alone_and_the_group_keeps_working(
    tiny_llama: Path, kinds: dict[str, Path], adapters: tuple[str, ...], mix: bool
):
    """Every (member, prompt) asked at once, queued behind a call that holds the device so that
    they can share passes, answers as when asked alone; rows of members PEFT cannot mix never
    share a pass, nor do rows of a prompt-learning adapter; afterwards every member still answers
    as before."""
    m = gg.Manager(devices="cpu", catalog=[], progress=False)
    try:
        m.register_group("g", base=tiny_llama, base_id="base", adapters={a: kinds[a] for a in adapters})
        members = ["base", *adapters]
        alone = {(mem, p): _key(_answer(m, mem, p)) for mem in members for p in PROMPTS}
        assert len({tuple(v) for v in alone.values()}) == len(alone), "each member and prompt answers differently"
        held = threading.Thread(target=m.run, args=("base", lambda model, tok: time.sleep(1.0)))
        held.start()
        time.sleep(0.3)
        together: dict[tuple[str, str], dict] = {}

        def ask(mem: str, prompt: str) -> None:
            together[mem, prompt] = _answer(m, mem, prompt)

        askers = [threading.Thread(target=ask, args=key) for key in alone]
        for t in askers:
            t.start()
        for t in askers + [held]:
            t.join()
        assert {k: _key(v) for k, v in together.items()} == alone
        sizes = {k: v["timing"]["batch_size"] for k, v in together.items()}
        virtual = {"prefix", "prompt"} & set(adapters)
        for (mem, _), size in sizes.items():
            if mem in virtual:
                assert size == 1
            else:
                # a pass holds both prompts of each member it may take: 2 alone, all if they mix
                assert size == (2 * (len(members) - len(virtual)) if mix else 2), sizes
        assert {k: _key(_answer(m, *k)) for k in alone} == alone
    finally:
        m.close()


def test_a_mixed_pass_that_peft_refuses_leaves_no_hooks_behind(tiny_llama: Path, kinds: dict[str, Path]):
    """Rows of a DoRA adapter and another member forced into one pass: PEFT refuses, and the
    runtime removes the row hooks PEFT left, so the next pass of either member works."""
    cat = Catalog()
    cat.register_group("g", base=str(tiny_llama), base_id="base", adapters={"dora": str(kinds["dora"]), "plain": str(kinds["plain"])})
    group = cat.group("g")
    rt = Runtime.load(group, {"base": tiny_llama, "dora": kinds["dora"], "plain": kinds["plain"]}, detect("cpu")[0], "float32")
    try:
        tok = rt.members["base"].tokenizer
        ids = tok([PROMPTS[0]] * 2, return_tensors="pt")
        with torch.inference_mode():
            with pytest.raises(ValueError, match="DoRA"), rt.rows(["dora", "base"]) as (model, extra):
                model(**ids, **extra)
            for member in ("dora", "plain", "base"):
                with rt.rows([member, member]) as (model, extra):
                    assert model(**ids, **extra).logits.shape[0] == 2
    finally:
        rt.unload()
