"""The runtime's member switch: its own fast path gives PEFT's logits, whatever the order of switches,
and rows of several members in one pass give PEFT's mixed-batch logits."""

from __future__ import annotations

from pathlib import Path

import torch

from gpugroups.catalog import Catalog
from gpugroups.engine.devices import detect
from gpugroups.engine.estimates import folders
from gpugroups.engine.runtime import Runtime

PROMPT = "def __init__(self"


def _logits(model, tok, **kw) -> torch.Tensor:
    enc = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc, **kw).logits[0, -1]


def test_switching_members_gives_the_logits_of_peft_own_switch(tiny_catalog_toml: Path):
    """Every order of members (base, adapters, back and forth) answers as PEFT's ``set_adapter`` /
    ``disable_adapter`` would on a second, independently switched copy of the same group."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cat = Catalog()
    cat.load_toml(tiny_catalog_toml)
    group = cat.group("tiny")
    where = folders(cat, group)
    rt = Runtime.load(group, where, detect("cpu")[0], "float32")
    try:
        assert rt._adapters.layers, "the fast path is in use for plain LoRA adapters"
        peft = rt.members["tiny-a"].model  # loaded as inference needs it: eval mode, frozen, first adapter on
        assert not any(m.training for m in peft.modules()) and not any(p.requires_grad for p in peft.parameters())
        assert peft.active_adapter == "tiny-a" and all(layer.active_adapters == ["tiny-a"] for layer in rt._adapters.layers)
        ref = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(where["tiny-base"]).eval(), where["tiny-a"], adapter_name="tiny-a"
        )
        ref.load_adapter(where["tiny-b"], adapter_name="tiny-b")
        ref.eval()
        tok = rt.members["tiny-base"].tokenizer
        seen: dict[str, torch.Tensor] = {}
        for member in ["tiny-b", "tiny-a", "tiny-base", "tiny-b", "tiny-base", "tiny-a", "tiny-a", "tiny-b"]:
            with rt.rows([member]) as (model, kw):
                got = _logits(model, tok, **kw)
                assert model.active_adapter == rt.members[member].adapter or member == "tiny-base"
            if member == "tiny-base":
                with ref.disable_adapter():
                    want = _logits(ref, tok)
            else:
                ref.set_adapter(member)
                want = _logits(ref, tok)
            torch.testing.assert_close(got, want)
            seen[member] = got
        assert not torch.allclose(seen["tiny-a"], seen["tiny-b"])
        assert not torch.allclose(seen["tiny-a"], seen["tiny-base"])
        # rows of several members in one pass, kept together or not: PEFT's own mixed batch
        for mixed in (["tiny-a", "tiny-base", "tiny-b", "tiny-a"], ["tiny-b", "tiny-b", "tiny-a", "tiny-base"]):
            with rt.rows(mixed) as (model, kw):
                assert kw == {}  # the slices path, not PEFT's walk
                got = _batch_logits(model, tok, len(mixed), **kw)
            names = [rt.members[m].adapter or "__base__" for m in mixed]
            want = _batch_logits(ref, tok, len(mixed), adapter_names=names)
            torch.testing.assert_close(got, want)
            for row, member in zip(got, mixed):
                torch.testing.assert_close(row, seen[member])
    finally:
        rt.unload()


def _batch_logits(model, tok, rows: int, **kw) -> torch.Tensor:
    enc = tok([PROMPT] * rows, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc, **kw).logits[:, -1]
