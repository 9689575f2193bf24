"""``encode``: a prompt's token ids as the tokenizer's own call gives them, asking a fast
tokenizer's backend directly only where that changes nothing; ``token_texts``: each token's text
as ``decode`` gives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from gpugroups.engine.tokens import _direct, encode, token_texts
from gpugroups.localfiles import DEMO_DIR

PROMPTS = [
    "def __init__(self", " leading and  double  spaces\n\ttabs", "<|endoftext|> after the special token",
    "ünïcødé and emoji 🤖", "x" * 300, "import os\nimport sys\n\n\nclass A:\n    pass\n",
]
DEMO_BASE = DEMO_DIR / "pycode-base"  # where the package is installed, checkout or not


def _ids(tok: Any, prompts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tok(prompts)["input_ids"]]


@pytest.mark.parametrize("which", ["session", "demo"])
def test_a_fast_tokenizer_is_asked_directly_and_gives_its_own_calls_ids(which: str, tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir if which == "session" else DEMO_BASE)
    assert _direct(type(tok))  # the short way applies to the tokenizers the project ships and builds
    assert encode(tok, PROMPTS) == _ids(tok, PROMPTS)
    assert encode(tok, PROMPTS[:1]) == _ids(tok, PROMPTS[:1])


def test_split_special_tokens_is_respected(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, split_special_tokens=True)
    special = ["<|endoftext|>"]
    assert encode(tok, special) == _ids(tok, special)
    assert encode(tok, special) != encode(AutoTokenizer.from_pretrained(tokenizer_dir), special)


def test_a_backend_left_truncating_or_padding_goes_through_the_tokenizer(tokenizer_dir: Path):
    """A backend someone set to truncate or pad would cut or pad the ids: the tokenizer's own call
    resets it, and the next call may take the short way again."""
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.backend_tokenizer.enable_truncation(max_length=3)
    assert encode(tok, PROMPTS) == _ids(plain, PROMPTS)
    assert tok.backend_tokenizer.truncation is None
    tok.backend_tokenizer.enable_padding(length=400)
    assert encode(tok, PROMPTS) == _ids(plain, PROMPTS)
    assert encode(tok, PROMPTS) == _ids(plain, PROMPTS)


def _own(tokenizer_dir: Path, **methods: Any) -> Any:
    """A tokenizer of a subclass of the session tokenizer's class that overrides ``methods``."""
    base = type(AutoTokenizer.from_pretrained(tokenizer_dir))
    return type("Own", (base,), methods).from_pretrained(tokenizer_dir)


def test_a_class_with_its_own_encoding_is_called_as_itself(tokenizer_dir: Path):
    """A tokenizer class that overrides how transformers encodes keeps its behaviour."""
    def reversed_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = type(self).__mro__[1]._encode_plus(self, *args, **kwargs)
        out["input_ids"] = [list(reversed(ids)) for ids in out["input_ids"]]
        return out

    tok = _own(tokenizer_dir, _encode_plus=reversed_ids)
    assert not _direct(type(tok))
    assert encode(tok, PROMPTS) == _ids(tok, PROMPTS) != _ids(AutoTokenizer.from_pretrained(tokenizer_dir), PROMPTS)


def test_token_texts_are_the_tokenizers_own_and_each_tokenizer_keeps_its_own(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = sorted({t for row in encode(tok, PROMPTS) for t in row})
    expected = [tok.decode([t]) for t in ids]
    assert token_texts(tok, ids) == expected
    assert token_texts(tok, ids[::-1]) == expected[::-1]  # the second time from what it kept

    def reversed_text(self: Any, *args: Any, **kwargs: Any) -> str:
        return str(type(self).__mro__[1].decode(self, *args, **kwargs))[::-1]

    other = _own(tokenizer_dir, decode=reversed_text)
    assert token_texts(other, ids) == [text[::-1] for text in expected] != expected
