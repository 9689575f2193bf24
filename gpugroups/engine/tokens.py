"""Between prompts and token ids, as the tokenizer's own calls do it, with as little Python as possible.

Every ``process`` request tokenizes its prompt and names its predicted tokens right after the
previous forward pass has pushed the interpreter's code and data out of the CPU caches, where
each line of Python costs several times what it does in a loop. There a call through
transformers' tokenizer (argument checks, truncation and padding set-up, ``BatchEncoding``)
costs about 0.13 ms, and naming three tokens 0.05 ms (stamped that way on a 2-core machine): a
large part of the manager's own work per request.

``encode``: a fast tokenizer's Rust backend does the work itself, in a fifth of that. transformers
adds nothing of its own to a plain call (no truncation, no padding, special tokens added) besides
putting the backend in the state that call needs, so where a tokenizer's class encodes as
transformers' fast tokenizer does (it overrides none of its encoding methods) and its backend is
in that state already, the backend is asked directly. Anything else (a slow tokenizer, a class
with its own encoding, a backend left truncating or padding) goes through the tokenizer as
usual, which also resets the backend, so the next call may take the short way.

``token_texts``: a token's text (``decode([id])``) never changes, so each tokenizer keeps the
texts it has made (at most one per token of its vocabulary).
"""

from __future__ import annotations

import weakref
from typing import Any

_Fast: type | None
try:  # transformers 5: the fast tokenizers' class
    from transformers.tokenization_utils_tokenizers import TokenizersBackend as _Fast
except ImportError:  # transformers 4: every call goes through the tokenizer
    _Fast = None
#: What makes a plain call's ids there: a class that overrides none of these encodes as it does.
_ENCODING = ("__call__", "_get_padding_truncation_strategies", "_switch_to_input_mode", "_encode_plus")

_DIRECT: dict[type, bool] = {}
_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def encode(tok: Any, prompts: list[str]) -> list[list[int]]:
    """Each prompt's token ids, special tokens added, not truncated or padded: what
    ``tok(prompts)["input_ids"]`` answers."""
    if _direct(type(tok)):
        backend = tok.backend_tokenizer
        if backend.truncation is None and backend.padding is None and backend.encode_special_tokens == tok.split_special_tokens:
            return [e.ids for e in backend.encode_batch(prompts, add_special_tokens=True)]
    # verbose=False: transformers would warn of "indexing errors" for a long prompt, but the
    # caller cuts it to fit, so the warning would only mislead the user.
    return [list(ids) for ids in tok(prompts, verbose=False)["input_ids"]]


def _direct(cls: type) -> bool:
    """Whether tokenizers of ``cls`` encode as transformers' fast tokenizer does (cached)."""
    if cls not in _DIRECT:
        _DIRECT[cls] = _Fast is not None and issubclass(cls, _Fast) and all(
            getattr(cls, name, None) is getattr(_Fast, name, None) for name in _ENCODING
        )
    return _DIRECT[cls]


def token_texts(tok: Any, ids: list[int]) -> list[str]:
    """Each token's text, as ``tok.decode([id])`` gives it."""
    texts = _TEXTS.get(tok)
    if texts is None:
        texts = _TEXTS.setdefault(tok, {})
    out = []
    for t in ids:
        text = texts.get(t)
        if text is None:
            text = texts[t] = tok.decode([t])
        out.append(text)
    return out
