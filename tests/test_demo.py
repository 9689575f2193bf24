"""The shipped demo models: the catalog registers them, they are small, and they are trained.

Checked with plain transformers + peft (not through the Manager) so that a broken model
file shows up here as itself. Each prediction check is one that random or shuffled weights
fail, and a test proves it on a shuffled copy of the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpugroups.catalog import Catalog
from gpugroups.localfiles import DEMO_DIR

ADAPTERS = ("pycode-tests", "pycode-docs")

#: Held-out text in the style of each adapter's slice (written here, not taken from the corpus).
SLICE_TEXT = {
    "pycode-tests": (
        "class ParserTests(unittest.TestCase):\n"
        "    def test_empty(self):\n"
        "        self.assertEqual(parse(''), [])\n"
        "        self.assertRaises(ValueError, parse, None)\n"
        "\n"
        "    def test_single(self):\n"
        "        result = parse('a')\n"
        "        self.assertEqual(len(result), 1)\n"
        "        self.assertTrue(result[0].valid)\n"
    ),
    "pycode-docs": (
        "Return the number of items in the queue. If the queue is empty, the function "
        "returns zero instead of raising an exception. This is the default behaviour, and "
        "it can be changed by passing a different value for the argument."
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_DIR / "pycode-base")


@pytest.fixture(scope="module")
def base():
    return AutoModelForCausalLM.from_pretrained(DEMO_DIR / "pycode-base").eval()


@pytest.fixture(scope="module")
def with_adapters():
    """One base with both adapters loaded, switched by ``set_adapter`` as the Manager does."""
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "pycode-base")
    model = PeftModel.from_pretrained(model, DEMO_DIR / "adapters" / ADAPTERS[0], adapter_name=ADAPTERS[0])
    model.load_adapter(DEMO_DIR / "adapters" / ADAPTERS[1], adapter_name=ADAPTERS[1])
    return model.eval()


@pytest.fixture(scope="module")
def gpt2():
    return AutoModelForCausalLM.from_pretrained(DEMO_DIR / "tinygpt2").eval()


def top(model, tokenizer, prompt: str, k: int) -> list[str]:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return [tokenizer.decode([i]) for i in logits.topk(k).indices.tolist()]


def loss_on(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def failed_checks(model, tokenizer) -> list[str]:
    """The code-model checks ``model`` fails (empty when it predicts Python sensibly)."""
    failed = []
    if not any(t == "," or t.startswith(")") for t in top(model, tokenizer, "def __init__(self", 3)):
        failed.append("no ',' or ')' after 'def __init__(self'")
    if not {" sys", " os", " re", " time"} & set(top(model, tokenizer, "import os\nimport", 5)):
        failed.append("no module name after 'import os\\nimport'")
    if ":" not in top(model, tokenizer, "    for key, value in items", 3):
        failed.append("no ':' to close a for statement")
    # Untrained or shuffled weights sit near ln(2048) = 7.6 nats; the demo models are near 4.
    if loss_on(model, tokenizer, SLICE_TEXT["pycode-tests"]) > 5.0:
        failed.append("loss on a short Python snippet above 5 nats")
    return failed


def test_catalog_registers_the_demo():
    catalog = Catalog(roots=[])
    added = catalog.add_demo()
    assert [g.id for g in added] == ["pycode", "tinygpt2"]
    pycode = catalog.group("pycode")
    assert (pycode.kind, pycode.base, pycode.members) == ("adapters", "pycode-base", ["pycode-base", *ADAPTERS])
    assert catalog.group("tinygpt2").kind == "models"
    assert catalog.group_of("tinygpt2").id == "tinygpt2"
    for model in catalog.models.values():
        folder = Path(model.source)
        assert folder.is_absolute() and folder.parent.is_relative_to(DEMO_DIR), model
        marker = "adapter_config.json" if model.role == "adapter" else "config.json"
        assert (folder / marker).is_file(), model


def test_demo_is_at_most_20_mb():
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total <= 20_000_000


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_config_names_no_local_path(adapter):
    config = json.loads((DEMO_DIR / "adapters" / adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "pycode-base"


def test_tokenizer_round_trips_code(tokenizer):
    code = "class Point:\n    def __init__(self, x):\n        self.x = x  # é\n"
    ids = tokenizer(code, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == code
    assert len(ids) < len(code) / 2  # merges learned: code is compressed, not byte by byte
    assert len(tokenizer) == 2048
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_base_predicts_python(base, tokenizer):
    assert failed_checks(base, tokenizer) == []


def test_checks_catch_shuffled_weights(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR / "pycode-base").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=gen)].view_as(p))
    assert len(failed_checks(model, tokenizer)) >= 3


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_fits_its_slice_better_than_base(with_adapters, tokenizer, adapter):
    with_adapters.set_adapter(adapter)
    tuned = loss_on(with_adapters, tokenizer, SLICE_TEXT[adapter])
    with with_adapters.disable_adapter():
        plain = loss_on(with_adapters, tokenizer, SLICE_TEXT[adapter])
    assert tuned < plain - 0.1


@pytest.mark.parametrize(
    "adapter, prompt", [("pycode-tests", "        self."), ("pycode-docs", "If the file")]
)
def test_switching_adapters_changes_top_predictions(with_adapters, tokenizer, adapter, prompt):
    other = ADAPTERS[1 - ADAPTERS.index(adapter)]
    with_adapters.set_adapter(adapter)
    tuned = top(with_adapters, tokenizer, prompt, 3)
    with_adapters.set_adapter(other)
    assert top(with_adapters, tokenizer, prompt, 3) != tuned
    with with_adapters.disable_adapter():
        assert top(with_adapters, tokenizer, prompt, 3) != tuned


def test_tinygpt2_predicts_python(gpt2, tokenizer):
    assert gpt2.config.model_type == "gpt2"
    assert failed_checks(gpt2, tokenizer) == []
