"""Predictions: top-N next tokens for a batch of prompts, and greedy continuations.

One call of ``predict`` serves every pending request of a resident group in one forward pass:
prompts are left-padded, positions follow the attention mask (so a padded row computes what it
would alone), and only the last position's logits are computed where the model allows it. A
request over its work budget is refused once its prompt is tokenized, and a generation stops
between steps when its request is cancelled.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import GpuGroupsError
from ..protocol import request_work
from .runtime import Runtime
from .worker import Request


def predict(
    rt: Runtime, requests: list[Request], stopped: Callable[[Request], bool] = lambda r: False
) -> list[dict[str, Any] | GpuGroupsError]:
    """Answer ``requests`` (members of one batchable set of ``rt``) with one forward pass.

    Returns, per request, ``{"predictions": [...], "prompt_tokens", "truncated", "timing"}``, or
    the ``invalid_request`` of a request over its work budget (it takes no part in the pass). A
    request for which ``stopped`` turns true gets no more generation steps.
    """
    t0 = time.perf_counter()
    outcomes: list[dict[str, Any] | GpuGroupsError | None] = []
    encoded: list[tuple[Request, list[int], bool]] = []
    for r in requests:
        try:
            ids, cut = _encode(rt, r)
        except GpuGroupsError as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)  # answered by the forward pass below
            encoded.append((r, ids, cut))
    answers = iter(_forward(rt, encoded, stopped, t0) if encoded else [])
    return [next(answers) if o is None else o for o in outcomes]


def _encode(rt: Runtime, r: Request) -> tuple[list[int], bool]:
    """The prompt's token ids, cut from the left to fit the context, and whether they were cut;
    ``invalid_request`` if the request's work (``protocol.request_work``) is over its budget."""
    member = rt.members[r.member]
    # verbose=False: transformers would warn of "indexing errors" for a long prompt, but
    # the prompt is cut to fit just below, so the warning would only mislead the user.
    ids = list(member.tokenizer(r.prompt, verbose=False)["input_ids"])
    room = max(1, member.context_length - r.max_new_tokens - 1)
    cut = len(ids) > room
    if cut:
        r.notes.append(
            f"prompt truncated from the left: {len(ids)} tokens kept the last {room} (model context {member.context_length})"
        )
        ids = ids[-room:]
    work = request_work(len(ids), r.num_predictions, r.max_new_tokens)
    if r.max_work is not None and work > r.max_work:
        raise GpuGroupsError(
            "invalid_request",
            f"process: this request costs {work} units of work (prompt {len(ids)} tokens, num_predictions "
            f"{r.num_predictions}, max_new_tokens {r.max_new_tokens}); the limit is {r.max_work} "
            "(Manager(max_request_work=...)): ask for fewer predictions, fewer new tokens or a shorter prompt",
            {"work": work, "max_request_work": r.max_work, "prompt_tokens": len(ids)},
        )
    return ids, cut


def _forward(
    rt: Runtime, encoded: list[tuple[Request, list[int], bool]], stopped: Callable[[Request], bool], t0: float
) -> list[dict[str, Any]]:
    requests = [r for r, _, _ in encoded]
    rows = [ids for _, ids, _ in encoded]
    truncated = [cut for _, _, cut in encoded]
    tok = rt.members[requests[0].member].tokenizer
    device = torch.device(rt.device.backing)
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
        if r.max_new_tokens > 0 and not stopped(r):
            stop = functools.partial(stopped, r)
            for p, text in zip(preds, _continue(rt, r.member, rows[i], top_ids, r.max_new_tokens, device, stop)):
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


def _continue(
    rt: Runtime, member: str, prompt_ids: list[int], first: list[int], n: int, device: torch.device,
    stop: Callable[[], bool],
) -> list[str]:
    """Greedy continuation of the prompt after each of ``first`` tokens, ``n`` tokens in all (fewer
    once ``stop()`` is true: it is asked after every step)."""
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
                stopping_criteria=StoppingCriteriaList([_Stop(stop)]),
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


class _Stop(StoppingCriteria):
    """Ends a generation between two steps once its request is cancelled."""

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.stop(), dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(model: Any) -> frozenset[str]:
    """The keyword arguments the underlying transformers model's ``forward`` accepts (cached)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(inner)
    if cls not in _PARAMS:
        _PARAMS[cls] = frozenset(inspect.signature(inner.forward).parameters)
    return _PARAMS[cls]
