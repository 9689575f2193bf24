"""No forward pass takes more than the group's runtime reserve: long prompts are cut to what the
reserve holds, and rows that do not fit one pass together run in several, with the same answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gpugroups.catalog import GroupSpec
from gpugroups.engine.budget import PassBudget
from gpugroups.engine.calls import Request
from gpugroups.engine.devices import Device
from gpugroups.engine.estimate import config_of, reserve_parts
from gpugroups.engine.inference import predict
from gpugroups.engine.runtime import Runtime
from gpugroups.engine.turns import MAX_BATCH
from tests import tinymodels

CONTEXT = 4096  # far beyond what the reserve (8 rows of 512 tokens) holds with eager attention


@pytest.fixture(scope="module")
def eager_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with a long context that runs eager attention (seq^2 scores per head)."""
    root = tmp_path_factory.mktemp("budget")
    tok = tinymodels.build_tokenizer(root / "tok")
    folder = tinymodels.build_causal_lm(root / "m", "llama", tokenizer_dir=tok, context=CONTEXT)
    config = json.loads((folder / "config.json").read_text())
    config["attn_implementation"] = "eager"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def runtime(eager_model: Path) -> Any:
    group = GroupSpec(id="single:eager", kind="single", name="eager", members=["eager"])
    device = Device(0, "cpu", "cpu", "cpu", 1 << 34, 1 << 34, "cpu")
    rt = Runtime.load(group, {"eager": eager_model}, device, "float32")
    yield rt
    rt.unload()


def _prompt(runtime: Any, tokens: int, seed: int = 0) -> str:
    """A prompt of exactly ``tokens`` tokens: ``tokens`` ids decoded (each id is one token)."""
    tok = runtime.members["eager"].tokenizer
    ids = torch.randint(1, tok.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    text = tok.decode(ids)
    assert len(tok(text)["input_ids"]) >= tokens // 2  # long, whatever the merges made of it
    return text


def test_a_budget_admits_exactly_what_fits(eager_model: Path) -> None:
    config = config_of(eager_model)
    reserve = reserve_parts(config, "float32")
    eager = PassBudget(config, "float32", reserve, "eager")
    sdpa = PassBudget(config, "float32", reserve, "sdpa")
    n = eager.max_seq()
    assert 1 < n < CONTEXT
    assert eager.fits(1, n) and not eager.fits(1, n + 1)
    assert sdpa.max_seq() > n  # no seq^2 scores: longer prompts fit the same reserve
    assert eager.max_seq(new_tokens=1_000_000) < n  # a continuation's KV cache takes its share
    rows = eager.max_rows(512)
    assert rows >= 8 and eager.fits(rows, 512) and not eager.fits(rows + 1, 512)


def test_a_prompt_longer_than_the_reserve_holds_is_cut_to_fit(runtime: Any) -> None:
    budget = runtime.members["eager"].budget
    assert budget.attention == "eager"  # the attention the loaded model runs, not a guess
    long = _prompt(runtime, CONTEXT - 64)
    [result] = predict(runtime, [Request("eager", long, 3)])
    assert result["truncated"] and result["prompt_tokens"] == budget.max_seq()
    assert "runtime reserve" in result["notes"][0]
    short = predict(runtime, [Request("eager", "def f(x):", 3)])[0]
    assert not short["truncated"] and short["notes"] == []


def predict_in_passes(runtime: Any, requests: list[Request]) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """``predict``'s answers, and the (rows, tokens) of each forward pass it ran on the member."""
    passes: list[tuple[int, int]] = []
    model = runtime.members["eager"].model
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: passes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        return predict(runtime, requests), passes
    finally:
        hook.remove()


def test_rows_that_do_not_fit_one_pass_run_in_several_with_the_same_answers(runtime: Any) -> None:
    budget = runtime.members["eager"].budget
    tok = runtime.members["eager"].tokenizer
    prompts = [_prompt(runtime, budget.max_seq() * 4 // 5, seed) for seed in range(3)] + ["import os", "x = 1"]
    shortest_long = min(min(len(tok(p)["input_ids"]), budget.max_seq()) for p in prompts[:3])
    assert not budget.fits(2, shortest_long)  # one long row fits a pass, two together do not
    alone = [predict(runtime, [Request("eager", p, 5)])[0] for p in prompts]

    together, passes = predict_in_passes(runtime, [Request("eager", p, 5) for p in prompts])

    assert len(passes) >= 3 and all(budget.fits(rows, width) for rows, width in passes)
    assert sum(rows for rows, _ in passes) == len(prompts)
    for a, b in zip(alone, together):
        assert [p["token_id"] for p in a["predictions"]] == [p["token_id"] for p in b["predictions"]]
        for pa, pb in zip(a["predictions"], b["predictions"]):
            assert abs(pa["probability"] - pb["probability"]) < 1e-5


def test_a_full_batch_of_short_prompts_runs_as_one_pass_with_the_same_answers(runtime: Any) -> None:
    """The reserve is set aside on one device as a whole: a full batch of short rows needs more
    logits than the reference batch but far fewer activations, so it fits one pass."""
    budget = runtime.members["eager"].budget
    logits_only = reserve_parts(budget.config, budget.dtype, MAX_BATCH, 8, 0, budget.attention).logits
    assert logits_only > budget.reserve.logits  # more rows than the reserve's batch ...
    assert budget.fits(MAX_BATCH, 8)  # ... and the pass as a whole fits
    prompts = [f"x = {i} + y" for i in range(MAX_BATCH)]
    together, passes = predict_in_passes(runtime, [Request("eager", p, 3) for p in prompts])
    assert [rows for rows, _ in passes] == [MAX_BATCH]
    for i in (0, 7, MAX_BATCH - 1):
        [alone] = predict(runtime, [Request("eager", prompts[i], 3)])
        assert [p["token_id"] for p in alone["predictions"]] == [p["token_id"] for p in together[i]["predictions"]]


def test_continuations_run_as_many_rows_per_pass_as_the_budget_holds(runtime: Any) -> None:
    budget = runtime.members["eager"].budget
    prompt = _prompt(runtime, budget.max_seq() // 2, seed=7)
    rows = budget.max_rows(len(runtime.members["eager"].tokenizer(prompt)["input_ids"]) + 1, 3, most=40)
    assert rows < 40  # so 40 continued predictions need several passes
    batches: list[int] = []
    model = runtime.members["eager"].model
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        [result] = predict(runtime, [Request("eager", prompt, 40, max_new_tokens=4)])
    finally:
        hook.remove()
    assert max(batches) == rows  # the continued predictions ran ``rows`` at a time
    assert len(result["predictions"]) == 40 and all(p["text"] for p in result["predictions"])
    first = result["predictions"][0]
    [alone] = predict(runtime, [Request("eager", prompt, 1, max_new_tokens=4)])
    assert alone["predictions"][0]["text"] == first["text"]  # greedy: the same text, batched or not
