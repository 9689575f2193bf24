"""Predictions: top-N next tokens for a batch of prompts, and greedy continuations.

One call of ``predict`` serves every pending request of a resident group in one forward pass:
prompts are left-padded, positions follow the attention mask (so a padded row computes what it
would alone), and only the last position's logits are computed where the model allows it.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any

import torch

from .runtime import Runtime
from .worker import Request


def predict(rt: Runtime, requests: list[Request]) -> list[dict[str, Any]]:
    """Answer ``requests`` (members of one batchable set of ``rt``) with one forward pass.

    Returns, per request, ``{"predictions": [...], "prompt_tokens", "truncated", "timing"}``.
    """
    t0 = time.perf_counter()
    member = rt.members[requests[0].member]
    tok = member.tokenizer
    rows: list[list[int]] = []
    truncated: list[bool] = []
    for r in requests:
        # verbose=False: transformers would warn of "indexing errors" for a long prompt, but
        # the prompt is cut to fit just below, so the warning would only mislead the user.
        ids = list(tok(r.prompt, verbose=False)["input_ids"])
        room = max(1, member.context_length - r.max_new_tokens - 1)
        truncated.append(len(ids) > room)
        if truncated[-1]:
            r.notes.append(
                f"prompt truncated from the left: {len(ids)} tokens kept the last {room} (model context {member.context_length})"
            )
            ids = ids[-room:]
        rows.append(ids)
    device = torch.device(member.device)
    width = max(len(ids) for ids in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    t1 = time.perf_counter()
    with torch.inference_mode(), rt.rows([r.member for r in requests]) as (model, extra):
        kwargs = dict(extra)
        accepted = _forward_params(model)
        if "position_ids" in accepted:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in accepted:
            kwargs["logits_to_keep"] = 1
        logits = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    t2 = time.perf_counter()
    vocab = logprobs.shape[-1]
    results = []
    for i, r in enumerate(requests):
        k = min(r.num_predictions, vocab)
        top = torch.topk(logprobs[i], k)
        top_lp, top_ids = top.values.tolist(), top.indices.tolist()
        preds = [
            {"token": tok.decode([t]), "token_id": t, "probability": math.exp(lp), "logprob": lp}
            for t, lp in zip(top_ids, top_lp)
        ]
        if r.max_new_tokens > 0:
            for p, text in zip(preds, _continue(rt, r.member, rows[i], top_ids, r.max_new_tokens, device)):
                p["text"] = text
        results.append(
            {
                "predictions": preds,
                "prompt_tokens": len(rows[i]),
                "truncated": truncated[i],
                "notes": r.notes,
                "timing": {
                    "batch_size": len(requests),
                    "tokenize_ms": (t1 - t0) * 1e3,
                    "forward_ms": (t2 - t1) * 1e3,
                    "total_ms": (time.perf_counter() - t0) * 1e3,
                },
            }
        )
    return results


def _continue(rt: Runtime, member: str, prompt_ids: list[int], first: list[int], n: int, device: torch.device) -> list[str]:
    """Greedy continuation of the prompt after each of ``first`` tokens, ``n`` tokens in all."""
    tok = rt.members[member].tokenizer
    ids = torch.tensor([prompt_ids + [t] for t in first], dtype=torch.long, device=device)
    with torch.inference_mode(), rt.rows([member] * len(first)) as (model, extra):
        if n > 1:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n - 1,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                **extra,
            )
        else:
            out = ids
    texts = []
    for row in out.tolist():
        first_tok, rest = row[len(prompt_ids)], row[len(prompt_ids) + 1:]
        if tok.eos_token_id in rest:  # generation stopped: what follows is padding
            rest = rest[: rest.index(tok.eos_token_id)]
        texts.append(tok.decode([first_tok, *rest]))
    return texts


_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(model: Any) -> frozenset[str]:
    """The keyword arguments the underlying transformers model's ``forward`` accepts (cached)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(inner)
    if cls not in _PARAMS:
        _PARAMS[cls] = frozenset(inspect.signature(inner.forward).parameters)
    return _PARAMS[cls]
