"""Predictions: top-N next tokens for a batch of prompts, and greedy continuations.

One call of ``predict`` serves every pending request of a resident group in one forward pass:
prompts are tokenized in one call, left-padded, positions follow the attention mask (so a padded
row computes what it would alone), and only the last position's logits are computed where the
model allows it, with no KV cache (nothing continues from that pass). A request over its work
budget is refused once its prompt is tokenized, and a generation stops between steps when its
request is cancelled. No pass takes more memory than the group's runtime reserve (the member's
``PassBudget``): a prompt longer than the reserve holds is cut from the left like one longer
than the context, and rows (prompts, or the continued predictions) that do not fit one pass
together run in several, shortest rows first so that long ones share the splits and short ones
are not padded to them.
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
from ..protocol import check_work
from .budget import PassBudget
from .calls import Request
from .runtime import Runtime
from .tokens import encode, token_texts


def predict(
    rt: Runtime, requests: list[Request], stopped: Callable[[Request], bool] = lambda r: False
) -> list[dict[str, Any] | GpuGroupsError]:
    """Answer ``requests`` (members of one batchable set of ``rt``) with one forward pass, or
    several where the rows together would not fit the member's budget.

    Returns, per request, ``{"predictions": [...], "prompt_tokens", "truncated", "timing"}``, or
    the ``invalid_request`` of a request over its work budget (it takes no part in the pass). A
    request for which ``stopped`` turns true gets no more generation steps.
    """
    t0 = time.perf_counter()
    outcomes: list[dict[str, Any] | GpuGroupsError | None] = []
    encoded: list[tuple[Request, list[int], bool]] = []
    for r, ids in zip(requests, _tokenize(rt, requests)):
        try:
            ids, cut = _fit(rt, r, ids)
        except GpuGroupsError as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)  # answered by the forward pass below
            encoded.append((r, ids, cut))
    answers = iter(_forward(rt, encoded, stopped, t0) if encoded else [])
    return [next(answers) if o is None else o for o in outcomes]


def _tokenize(rt: Runtime, requests: list[Request]) -> list[list[int]]:
    """Each request's prompt as token ids: one tokenizer call for every prompt of a tokenizer (the
    members of one batch share theirs), a fraction of the calls' cost one by one."""
    out: list[list[int]] = [[] for _ in requests]
    by_tokenizer: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        by_tokenizer.setdefault(id(rt.members[r.member].tokenizer), []).append(i)
    for rows in by_tokenizer.values():
        tok = rt.members[requests[rows[0]].member].tokenizer
        for i, ids in zip(rows, encode(tok, [requests[i].prompt for i in rows]), strict=True):
            out[i] = ids
    return out


def _fit(rt: Runtime, r: Request, ids: list[int]) -> tuple[list[int], bool]:
    """The prompt's token ``ids``, cut from the left to fit the context and the member's pass
    budget, and whether they were cut; ``invalid_request`` if the prompt has no tokens, if the request's work
    (``protocol.request_work``) is over its budget, or its continuation alone would not fit the
    memory reserve."""
    member = rt.members[r.member]
    budget = member.budget
    if not ids:
        raise GpuGroupsError(
            "invalid_request", f"prompt {r.prompt[:40]!r} gives no tokens with the tokenizer of {r.member!r}: nothing to predict from"
        )
    # the model takes the prompt, then for a continuation its first token and all but the last new one
    context_room = member.context_length - max(0, r.max_new_tokens - 1)
    # a continuation's pass holds the prompt, its first token and the tokens that follow
    memory_room = budget.max_seq(r.max_new_tokens) - (1 if r.max_new_tokens else 0)
    if memory_room < 1:
        raise GpuGroupsError(
            "invalid_request",
            f"max_new_tokens={r.max_new_tokens} does not fit the group's runtime reserve "
            f"({sum(budget.reserve)} bytes) even for a one-token prompt; ask for fewer new tokens",
        )
    if context_room < 1:  # learned positions (GPT-2) would fail with an index error, others answer past what they know
        raise GpuGroupsError(
            "invalid_request",
            f"max_new_tokens={r.max_new_tokens} does not fit the {member.context_length}-token context of "
            f"{r.member!r} even after a one-token prompt; ask for {member.context_length} new tokens at most",
        )
    room = min(context_room, memory_room)
    cut = len(ids) > room
    if cut:
        why = (
            f"model context {member.context_length}" if room == context_room
            else f"the group's runtime reserve holds {room} tokens in one pass"
        )
        r.notes.append(f"prompt truncated from the left: {len(ids)} tokens kept the last {room} ({why})")
        ids = ids[-room:]
    check_work(len(ids), r.num_predictions, r.max_new_tokens, r.max_work)
    return ids, cut


def _forward(
    rt: Runtime, encoded: list[tuple[Request, list[int], bool]], stopped: Callable[[Request], bool], t0: float
) -> list[dict[str, Any]]:
    requests = [r for r, _, _ in encoded]
    rows = [ids for _, ids, _ in encoded]
    truncated = [cut for _, _, cut in encoded]
    member = rt.members[requests[0].member]
    tok = member.tokenizer
    device = torch.device(member.device)
    t1 = time.perf_counter()
    logprobs = _logprobs(rt, [r.member for r in requests], rows, member.budget, tok, device)
    t2 = time.perf_counter()
    tops = _top(logprobs, [r.num_predictions for r in requests])
    results = []
    for i, r in enumerate(requests):
        top_ids, top_lp = tops[i]
        preds = [
            {"token": text, "token_id": t, "probability": math.exp(lp), "logprob": lp}
            for t, text, lp in zip(top_ids, token_texts(tok, top_ids), top_lp)
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


def _logprobs(
    rt: Runtime, members: list[str], rows: list[list[int]], budget: PassBudget, tok: Any, device: torch.device
) -> torch.Tensor:
    """The log-probabilities after each row's last token (a row per row of ``rows``), in as few
    passes as the budget allows. Rows go in order of length, so that a split puts long rows
    together and each pass pads little; within a pass, rows of one member follow each other,
    which is what a mixed batch costs least with (``Adapters.mixed``)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: torch.Tensor | None = None
    for start, end in _passes([len(rows[i]) for i in order], budget):
        chunk = sorted(order[start:end], key=lambda i: members[i])
        part = _last_logprobs(rt, [members[i] for i in chunk], [rows[i] for i in chunk], tok, device)
        if out is None:
            out = part.new_empty((len(rows), part.shape[-1]))
        out[chunk] = part
    assert out is not None
    return out


def _top(logprobs: torch.Tensor, counts: list[int]) -> list[tuple[list[int], list[float]]]:
    """Each row's ``counts[i]`` most likely token ids and their log-probabilities, most likely
    first: one ``topk`` for the rows that ask the same count (usually all of them)."""
    vocab = logprobs.shape[-1]
    out: list[tuple[list[int], list[float]]] = [([], [])] * len(counts)
    for k in set(counts):
        rows = [i for i, c in enumerate(counts) if c == k]
        top = torch.topk(logprobs if len(rows) == len(counts) else logprobs[rows], min(k, vocab))
        for i, ids, lps in zip(rows, top.indices.tolist(), top.values.tolist(), strict=True):
            out[i] = (ids, lps)
    return out


def _passes(lengths: list[int], budget: PassBudget) -> list[tuple[int, int]]:
    """Consecutive runs of rows (``[start, end)``) that each fit the budget as one pass."""
    out: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        end, width = start + 1, lengths[start]
        while end < len(lengths) and budget.fits(end - start + 1, max(width, lengths[end])):
            width = max(width, lengths[end])
            end += 1
        out.append((start, end))
        start = end
    return out


def _last_logprobs(
    rt: Runtime, members: list[str], rows: list[list[int]], tok: Any, device: torch.device
) -> torch.Tensor:
    """One forward pass over left-padded ``rows``: the log-probabilities after each row's last token.

    The inputs are made from Python lists in one step each, and positions are given only where a
    row is padded (else the model's own, the same): a handful of small tensor operations cost
    more than a tenth of a millisecond right after a forward pass, on every request."""
    width = max(len(ids) for ids in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], dtype=torch.long, device=device)
    with torch.inference_mode(), rt.rows(members) as (model, extra):
        kwargs = dict(extra)
        accepted = _forward_params(model)
        if "position_ids" in accepted and any(len(ids) < width for ids in rows):
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in accepted:
            kwargs["logits_to_keep"] = 1
        if "use_cache" in accepted:  # nothing continues from this pass: building its KV cache is waste
            kwargs["use_cache"] = False
        logits = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits[:, -1, :]
        return torch.log_softmax(logits.float(), dim=-1)


def _continue(
    rt: Runtime, member: str, prompt_ids: list[int], first: list[int], n: int, device: torch.device,
    stop: Callable[[], bool],
) -> list[str]:
    """Greedy continuation of the prompt after each of ``first`` tokens, ``n`` tokens in all (fewer
    once ``stop()`` is true: it is asked after every step), as many rows per pass as the member's
    budget holds."""
    m = rt.members[member]
    tok = m.tokenizer
    out: list[list[int]] = []
    if n > 1:
        step = m.budget.max_rows(len(prompt_ids) + 1, n - 1, most=len(first))
        for start in range(0, len(first), step):
            if out and stop():
                break  # cancelled between passes: the rest get no continuation
            ids = torch.tensor([prompt_ids + [t] for t in first[start:start + step]], dtype=torch.long, device=device)
            with torch.inference_mode(), rt.rows([member] * len(ids)) as (model, extra):
                out += model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n - 1,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([_Stop(stop)]),
                    **extra,
                ).tolist()
    else:
        out = [prompt_ids + [t] for t in first]
    texts = []
    for row in out:
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
