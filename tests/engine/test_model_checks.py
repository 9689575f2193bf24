"""Models a user brings that transformers would load wrong, or that once broke a load or an
answer: each is refused with an error that says why, or answered as plain transformers does, and
the manager goes on as before.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.engine.torchkit import declared_context
from tests.tinymodels import build_causal_lm, build_lora_adapter


def _manager(*roots: Path) -> gg.Manager:
    """A manager on the cpu with an empty catalog whose allowed roots are ``roots``."""
    return gg.Manager(devices="cpu", catalog=Catalog(roots=list(roots)), progress=False)


def _copy_with_tokenizer(model: torch.nn.Module, folder: Path, tokenizer_dir: Path) -> Path:
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    return folder


def test_a_model_that_is_not_a_causal_lm_is_refused_by_name(tmp_path: Path, tokenizer_dir: Path, tiny_llama: Path):
    """A BERT masked LM (which transformers would run as a causal ``BertLMHeadModel``) and a T5
    (which it refuses with a list of every config class) are ``load_failed`` naming what they are;
    nothing stays loaded and the manager loads a causal LM next."""
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    bert = _copy_with_tokenizer(
        BertForMaskedLM(BertConfig(vocab_size=800, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
        tmp_path / "bert", tokenizer_dir,
    )
    t5 = _copy_with_tokenizer(
        T5ForConditionalGeneration(T5Config(vocab_size=800, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)),
        tmp_path / "t5", tokenizer_dir,
    )
    m = _manager(tmp_path, tiny_llama.parent)
    try:
        for folder, kind in ((bert, "BertForMaskedLM"), (t5, "T5ForConditionalGeneration")):
            m.register_group(folder.name, models={folder.name: folder})
            with pytest.raises(gg.GpuGroupsError) as err:
                m.process(folder.name, "def main(")
            assert err.value.code == "load_failed"
            assert f"holds a {kind}, not a causal language model" in str(err.value) and len(str(err.value)) < 400
            assert m.state()["devices"][0]["memory"]["manager_bytes"] == 0
        assert m.process(str(tiny_llama), "def main(")["predictions"]
    finally:
        m.close()


def test_a_checkpoint_missing_weights_is_refused_and_frees_what_it_built(tmp_path: Path, tiny_llama: Path):
    """A checkpoint without ``lm_head.weight`` would load with a random head (answers that change
    on every load; transformers only logs it): ``load_failed`` naming the weight. And a failed
    load keeps no model alive, as an adapter folder without its config once did (the error's
    traceback held the half-built group)."""
    from safetensors.torch import load_file, save_file

    missing = tmp_path / "no-head"
    shutil.copytree(tiny_llama, missing)
    weights = load_file(missing / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    broken = build_lora_adapter(tmp_path / "broken", tiny_llama, seed=3)
    (broken / "adapter_config.json").unlink()

    def models() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.Module) and type(o).__name__.endswith("ForCausalLM")}

    before = models()  # other tests' (meta models kept for device maps, fixtures' managers)

    def alive() -> list[int]:
        return sorted(models() - before)

    m = _manager(tmp_path)
    try:
        with pytest.raises(gg.GpuGroupsError, match=r"lacks 1 weight\(s\) the model needs \(lm_head.weight\)"):
            m.load(str(missing))
        assert alive() == []
        m.register_group("half", base=tiny_llama, base_id="half-base", adapters={"broken": broken})
        with pytest.raises(gg.GpuGroupsError) as err:
            m.load("half-base")
        assert err.value.code == "load_failed"
        assert alive() == [] and m.state()["devices"][0]["memory"]["manager_bytes"] == 0
    finally:
        m.close()


def test_context_lengths_come_from_every_way_configs_declare_them():
    """MPT declares ``max_seq_len``, multimodal configs nest the language model's in
    ``text_config``; a prompt longer than either overran the position table (MPT) or was not cut."""
    assert declared_context({"model_type": "mpt", "max_seq_len": 256}) == 256
    assert declared_context({"model_type": "gemma3", "text_config": {"max_position_embeddings": 128}}) == 128
    assert declared_context({"n_positions": 64, "n_ctx": 32}) == 64
    assert declared_context({"max_position_embeddings": True}) is None


def test_a_prompt_as_long_as_the_context_is_answered_whole_as_transformers_does(tiny_gpt2: Path):
    """A prompt of exactly the model's context length fits: it was cut by one token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    context = json.loads((tiny_gpt2 / "config.json").read_text())["n_positions"]
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    ids = (tok("def f(x):\n    return x + 1\n")["input_ids"] * context)[:context]
    prompt = tok.decode(ids)
    assert tok(prompt)["input_ids"] == ids
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
        want = torch.topk(model(torch.tensor([ids])).logits[0, -1], 3).indices.tolist()
    m = _manager(tiny_gpt2.parent)
    try:
        got = m.process(str(tiny_gpt2), prompt, num_predictions=3)
        assert (got["prompt_tokens"], got["truncated"]) == (context, False)
        assert [p["token_id"] for p in got["predictions"]] == want
        cut = m.process(str(tiny_gpt2), prompt + " y", num_predictions=3)
        assert (cut["prompt_tokens"], cut["truncated"]) == (context, True)
    finally:
        m.close()


def test_a_continuation_longer_than_the_context_is_an_invalid_request(tmp_path: Path, tokenizer_dir: Path):
    """With learned positions (GPT-2) a continuation past the context failed with a raw
    ``IndexError`` (on a GPU, a device-side assert); it is refused before the pass, for every model."""
    short = build_causal_lm(tmp_path / "short-gpt2", "gpt2", tokenizer_dir=tokenizer_dir, context=16)
    m = _manager(tmp_path)
    try:
        full = m.process(str(short), "def f(x):", max_new_tokens=16)  # the prompt cut to one token
        assert full["prompt_tokens"] == 1 and full["truncated"] and full["predictions"][0]["text"]
        with pytest.raises(gg.GpuGroupsError) as refused:
            m.process(str(short), "def f(x):", max_new_tokens=17)
        assert refused.value.code == "invalid_request" and "16 new tokens at most" in refused.value.message
    finally:
        m.close()


def test_a_prompt_that_makes_no_tokens_is_an_invalid_request_alone_or_batched(tmp_path: Path, tiny_llama: Path):
    """With a tokenizer that drops whitespace, ``"   "`` is no tokens: ``invalid_request`` (not a
    reshape error alone, nor an answer from padding beside another request)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "main": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "words"
    shutil.copytree(tiny_llama, folder)
    for f in folder.glob("*token*"):
        f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(folder)
    m = _manager(tmp_path)
    try:
        want = m.process(str(folder), "def main", num_predictions=2)["predictions"]
        with pytest.raises(gg.GpuGroupsError, match="gives no tokens") as err:
            m.process(str(folder), "   ")
        assert err.value.code == "invalid_request"
        with ThreadPoolExecutor(2) as pool:
            with m.use(str(folder)):  # holds the device: the next two queue and share a pass
                pending = [pool.submit(m.process, str(folder), p, num_predictions=2) for p in ("def main", " \t ")]
                time.sleep(0.3)
            answers = [f.exception() or f.result() for f in pending]
        assert answers[0]["predictions"] == want
        assert isinstance(answers[1], gg.GpuGroupsError) and answers[1].code == "invalid_request"
    finally:
        m.close()


def test_a_lora_on_a_tied_output_head_loads_and_answers_as_peft(tmp_path: Path, tiny_gpt2: Path):
    """GPT-2 ties its head to the embedding and stores only the embedding: a LoRA on ``lm_head``
    (beside the Conv1D ``c_attn``) was refused as targeting a module the base lacks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = build_lora_adapter(tmp_path / "head", tiny_gpt2, seed=4, target_modules=["c_attn", "lm_head"])
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    with torch.inference_mode():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), adapter).eval()
        want = torch.topk(ref(**tok("def main(", return_tensors="pt")).logits[0, -1], 3).indices.tolist()
    m = _manager()
    try:
        m.register_group("tied", base=tiny_gpt2, base_id="tied-base", adapters={"tied-head": adapter})
        assert [p["token_id"] for p in m.process("tied-head", "def main(", num_predictions=3)["predictions"]] == want
    finally:
        m.close()


def test_register_group_takes_paths_and_trust_remote_code(tiny_llama: Path):
    """``register_group`` takes ``Path``s as ``from_pretrained`` does, and ``trust_remote_code`` as
    a catalog entry does."""
    m = _manager()
    try:
        m.register_group("p", models={"p1": tiny_llama}, trust_remote_code=True)
        assert m.catalog.group("p").trust_remote_code is True
        assert m.process("p1", "def main(")["predictions"]
    finally:
        m.close()
