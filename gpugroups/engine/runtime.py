"""A resident group on a device: load it, switch member, run forward passes, unload and free.

``adapters`` groups load the base once and every adapter onto it with PEFT; switching member
activates that adapter (or disables adapters for the bare base) — no allocation, no copy.
``models`` and single groups keep each member resident. A sharded group (a ``Span``) of one
model object is laid out layer by layer over several devices with a device map that follows
placement's split (``sharding.device_map``), its adapters beside their base layers; a sharded
``models`` group of several members puts each member whole on one of the span's devices.
Loading reports progress per stage (config, weights, each adapter) and unloading drops every
reference, collects garbage and empties the CUDA cache so the memory really returns.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import threading
import traceback
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..catalog import GroupSpec
from .adapters import BASE_ROW, Adapters
from .aftercare import Aftercare
from .budget import PassBudget
from .calls import Progress, Span
from .devices import Device
from .estimate import ShardReserve, config_of, group_reserve
from .torchkit import (
    CONSTRUCTION_LOCK,
    check_causal_lm,
    check_complete,
    context_length,
    import_transformers,
    measured_bytes,
    release_heap,
    torch_dtype,
)


@dataclass
class Member:
    """What a member needs for a forward pass: its model object, tokenizer and context length."""

    model: Any
    tokenizer: Any
    context_length: int
    device: str  # where its inputs go: the backing of its (first) device
    #: What one forward pass of it may take (the group's reserve; see ``PassBudget``).
    budget: PassBudget
    adapter: str | None = None  # adapters groups: the PEFT adapter name (None for the base)
    #: Its generation settings as loaded (continuations use the model's: put back after research).
    generation_config: Any = None


class Runtime:
    """A group loaded on one device. Only that device's worker uses it (``rows``, ``unload``)."""

    def __init__(self, group: GroupSpec, device: Device, dtype: str) -> None:
        self.group = group
        self.device = device
        self.dtype = dtype
        self.members: dict[str, Member] = {}
        self.bytes = 0
        self.shares: list[int] = []  # a sharded group's bytes per span device, in layer order
        self.reserves: list[int] = []  # and the runtime reserve each of those devices needs
        self._aftercare: Aftercare | None = None
        self._span: Span | None = None
        self.device_map: dict[str, int] = {}  # a sharded group's modules -> span position
        self._map_split: list[int] = []
        self._layers: list[int] = []  # decoder layers per span position, and the head's position
        self._head: int | None = None
        self._where: dict[str, int] = {}  # a sharded models group: member -> span position
        self._peft: Any = None
        self._adapters: Adapters | None = None  # the PEFT model's member switches
        self._switch_lock = threading.Lock()
        self._reserve: ShardReserve | None = None  # the group's runtime reserve, read once at load

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        group: GroupSpec,
        folders: dict[str, Path],
        device: Device,
        dtype: str,
        progress: Progress | None = None,
        span: Span | None = None,
    ) -> Runtime:
        """Load every member of ``group`` from ``folders`` (member id -> local folder) onto ``device``,
        or, with a ``span``, over the span's devices (``device`` is the first): one model layer
        by layer, several members each whole on one device.

        On any failure everything loaded so far is freed before the error propagates: the
        error's traceback would keep the models alive in its frames' variables (and a worker
        keeps its last error), so those are cleared.
        """
        import_transformers()  # before ``_quiet`` imports from it: never two threads' first imports at once
        rt = cls(group, device, dtype)
        rt._span = span
        report = progress or (lambda p, s: None)
        try:
            with CONSTRUCTION_LOCK, _quiet():
                rt._load(folders, report)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)
            rt.unload()
            raise
        rt.bytes = sum(measured_bytes(m) for m in {id(x.model): x.model for x in rt.members.values()}.values())
        if span is not None:
            rt._split(span)
        report(1.0, "ready")
        return rt

    def _split(self, span: Span) -> None:
        """Each span device's measured bytes and runtime reserve (virtual devices may share a
        backing, so the split comes from where the load put things, not from the backings)."""
        if self._where:  # whole members: each device runs its own members' passes
            self.shares = [0] * len(span.backings)
            for mid, pos in self._where.items():
                self.shares[pos] += measured_bytes(self.members[mid].model)
            self.reserves = [sum(span.reserve)] * len(span.backings)
            return
        total = sum(self._map_split) or 1  # one model: the map's split of what was measured
        self.shares = [self.bytes * b // total for b in self._map_split]
        self.shares[-1] += self.bytes - sum(self.shares)
        layout = self._layout()
        total_layers = sum(n for n, _ in layout)
        self.reserves = [span.reserve.on(n, total_layers, head) for n, head in layout]

    def _layout(self) -> tuple[tuple[int, bool], ...]:
        """A layered group's decoder layers and whether it holds the output head, per span
        position (every position counts the head when the model has none); () otherwise."""
        return tuple((n, self._head in (None, i)) for i, n in enumerate(self._layers))

    def _load(self, folders: dict[str, Path], report: Progress) -> None:
        import_transformers()
        from transformers import AutoTokenizer

        g = self.group
        steps = len(g.members) + 1
        kwargs: dict[str, Any] = {"dtype": torch_dtype(self.dtype), "trust_remote_code": g.trust_remote_code}
        span = self._span
        backing = {m: self.device.backing for m in g.members}  # where each member's inputs go
        layered: dict[str, str] | None = None  # one model over the span: its map
        if span is not None and g.kind == "models" and len(g.members) > 1:
            self._where = self._spread_members(folders)
            backing = {m: span.backings[pos] for m, pos in self._where.items()}
        elif span is not None:
            layered = self._device_map(folders[g.base if g.base is not None else g.members[0]])

        def placed(member: str) -> dict[str, Any]:
            if layered is not None:
                return {**kwargs, "device_map": layered}
            return kwargs if backing[member] == "cpu" else {**kwargs, "device_map": {"": backing[member]}}
        if g.kind == "adapters":
            base_dir = folders[g.base]  # type: ignore[index]
            report(0.0, f"loading base {g.base}")
            base = _pretrained(base_dir, placed(g.base))  # type: ignore[arg-type]
            tok = AutoTokenizer.from_pretrained(base_dir)
            ctx = context_length(base_dir)
            budget = self._budget(base_dir, base, folders)
            self.members[g.base] = Member(base, tok, ctx, backing[g.base], budget)  # type: ignore[index]
            report(1 / steps, f"loaded base {g.base}")
            adapters = [m for m in g.members if m != g.base]
            if adapters:
                from peft import PeftModel

                for i, aid in enumerate(adapters):
                    report((i + 1) / steps, f"loading adapter {aid}")
                    if self._peft is None:
                        self._peft = PeftModel.from_pretrained(base, folders[aid], adapter_name=aid, is_trainable=False)
                    else:
                        self._peft.load_adapter(folders[aid], adapter_name=aid, is_trainable=False)
                for aid in adapters:
                    self.members[aid] = Member(self._peft, tok, ctx, backing[g.base], budget, adapter=aid)  # type: ignore[index]
                self.members[g.base] = Member(self._peft, tok, ctx, backing[g.base], budget)  # type: ignore[index]
                # Each adapter loaded frozen is put in eval mode by PEFT, and the first one loaded
                # is the active one: ``eval()`` and ``set_adapter`` would walk the model (~5 ms)
                # to change nothing. ``activate`` says which one only where it is not already.
                self._adapters = Adapters(self._peft)
                self._adapters.activate(adapters[0])
        else:
            for i, mid in enumerate(g.members):
                report(i / steps, f"loading {mid}")
                model = _pretrained(folders[mid], placed(mid))
                tok = AutoTokenizer.from_pretrained(folders[mid])
                budget = self._budget(folders[mid], model, folders)
                self.members[mid] = Member(model, tok, context_length(folders[mid]), backing[mid], budget)
        for m in self.members.values():
            if m.tokenizer.pad_token_id is None:
                m.tokenizer.pad_token = m.tokenizer.eos_token or m.tokenizer.unk_token
            m.generation_config = copy.deepcopy(getattr(m.model, "generation_config", None))

    def _budget(self, folder: Path, model: Any, folders: dict[str, Path]) -> PassBudget:
        """A member's pass budget: the group's reserve, against the attention the model really runs
        (transformers may fall back to eager, which the config file does not say), on the devices
        its layers were laid out over (known by now: the map is made before the weights load)."""
        if self._reserve is None:
            self._reserve = group_reserve(self.group, folders, self.dtype)
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        return PassBudget(config_of(Path(folder)), self.dtype, self._reserve, attention, self._layout())

    def _spread_members(self, folders: dict[str, Path]) -> dict[str, int]:
        """Each member's span position: placement's shares of the members' weights, in member order."""
        from . import sharding
        from .estimate import weight_bytes

        span = self._span
        assert span is not None
        sizes = [weight_bytes(folders[m], self.dtype, self.group.trust_remote_code) for m in self.group.members]
        return dict(zip(self.group.members, sharding.assign(sizes, span.weight_bytes), strict=True))

    def _device_map(self, folder: Path) -> dict[str, str] | None:
        """The map over the span, by backing; None when every backing is the cpu."""
        from . import sharding

        span = self._span
        assert span is not None
        model = sharding.meta_model(folder, self.dtype, self.group.trust_remote_code)
        self.device_map, self._map_split = sharding.device_map(model, span.weight_bytes)
        self._layers, self._head = sharding.layer_split(model, self.device_map, len(span.backings))
        if all(b == "cpu" for b in span.backings):
            return None
        return {name: span.backings[pos] for name, pos in self.device_map.items()}

    # ---- using --------------------------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, member_ids: list[str]) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The model to call for a batch whose rows belong to ``member_ids``, and extra kwargs.

        All rows of one member: activate that adapter (or disable adapters for the base). Rows of
        several members of an adapters group: each row with its own adapter (``Adapters.mixed``;
        rows of one member kept together cost least). ``models`` groups batch per member.
        """
        first = self.members[member_ids[0]]
        if self._peft is None:
            if any(self.members[m].model is not first.model for m in member_ids):
                raise ValueError("rows of different models cannot share a batch")
            yield first.model, {}
            return
        names = [self.members[m].adapter or BASE_ROW for m in member_ids]
        switch = self._adapters
        assert switch is not None
        with self._switch_lock:
            if len(set(names)) > 1:
                with switch.mixed(names) as extra:
                    yield self._peft, extra
            elif names[0] == BASE_ROW:
                with switch.off():
                    yield self._peft, {}
            else:
                switch.activate(names[0])
                yield self._peft, {}

    @property
    def adapters(self) -> Adapters | None:
        """The PEFT model's member switches (None without adapters)."""
        return self._adapters

    def aftercare(self) -> Aftercare:
        """What puts the models back after research code (made on first use: it lists every module)."""
        if self._aftercare is None:
            self._aftercare = Aftercare(self)
        return self._aftercare

    def can_share_batch(self, a: str, b: str) -> bool:
        """Whether rows of members ``a`` and ``b`` may go into one forward pass."""
        if self._adapters is not None:
            return self._adapters.can_share(self.members[a].adapter, self.members[b].adapter)
        return self.members[a].model is self.members[b].model

    # ---- unloading ----------------------------------------------------------------------
    def unload(self) -> None:
        """Drop every reference to the models and give the memory back.

        Reference counting frees the tensors at once; a full ``gc.collect`` (hundreds of ms
        in a process that imported transformers) runs only if a reference cycle kept a model.
        Then each device gives back what its allocator keeps: CUDA's cache, or on the CPU the
        C heap's free pages (``release_heap``).
        """
        alive = [weakref.ref(m.model) for m in self.members.values()]
        self.members.clear()
        self._peft = None
        self._adapters = None
        self._aftercare = None
        if any(r() is not None for r in alive):
            gc.collect()
        for backing in {self.device.backing, *(self._span.backings if self._span else ())}:
            if backing.startswith("cuda"):  # every device the group spans gives its cache back
                with torch.cuda.device(backing):
                    torch.cuda.empty_cache()
            else:
                release_heap()


def _pretrained(folder: Path, kwargs: dict[str, Any]) -> Any:
    """The causal LM in ``folder``, in eval mode; ``invalid_model`` for another kind of model or
    a checkpoint that lacks weights (``check_causal_lm``, ``check_complete``)."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(folder, kwargs.get("trust_remote_code", False))
    loaded: Any = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    model, info = loaded
    check_complete(folder, info)
    return model.eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep transformers' progress bars, load reports and deprecation chatter out of the user's cell.

    Progress is reported through ``load_progress`` events instead; real failures still raise.
    """
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(hf_logging.log_levels["error"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

