"""How the members of an ``adapters`` group take turns on its one PEFT model: the active adapter,
the bare base, and rows of several members in one forward pass.

PEFT's own switches walk every module of the model on each call (``set_adapter``,
``disable_adapter``, a forward with ``adapter_names``); here the LoRA layers are found once at load
and each switch touches only them. Models whose adapters bring more than plain LoRA layers
(auxiliary modules such as ``modules_to_save``) keep PEFT's own paths.

Not every group can mix members in one pass (``can_share``): PEFT mixes rows of LoRA adapters
only, refuses DoRA (and then leaves its hooks on the model), fails on ``modules_to_save`` that not
every adapter has, and ignores ``adapter_names`` for other adapter types (IA3, prefix and prompt
tuning), answering every row with the active adapter. Rows of such groups go one member per pass,
and rows of a prompt- or prefix-tuning adapter one per pass: their virtual tokens come before the
padding, which changes a padded row's answer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from .torchkit import submodules

BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class Adapters:
    """The switches of one ``PeftModel`` with every adapter loaded frozen (``is_trainable=False``).
    Only its device's worker calls them, one forward pass at a time."""

    def __init__(self, peft: Any) -> None:
        self.peft = peft
        layers, auxiliary = _tuner_layers(peft)
        self.layers = [] if auxiliary else layers  # [] when a switch needs PEFT's own walk
        # Rows of several adapters are added slice by slice where every layer is a plain LoRA
        # ``Linear`` (no DoRA or other variant, whose mixed forward is PEFT's to do).
        self._plain = bool(self.layers) and all(_plain_linear(layer) for layer in self.layers)
        configs = peft.peft_config
        #: Whether rows of different members may share a pass: LoRA adapters without DoRA or
        #: auxiliary modules (see the module docstring).
        self.mixable = not auxiliary and all(
            c.peft_type == "LORA" and not getattr(c, "use_dora", False)
            for c in configs.values()
        )
        #: Adapters whose rows go one per pass: prompt learning prepends virtual tokens.
        self.alone = frozenset(name for name, c in configs.items() if getattr(c, "is_prompt_learning", False))

    def can_share(self, a: str | None, b: str | None) -> bool:
        """Whether rows of adapters ``a`` and ``b`` (None: the bare base) may go into one pass."""
        if a in self.alone or b in self.alone:
            return False
        return a == b or self.mixable

    def activate(self, adapter: str) -> None:
        """Make ``adapter`` the active one, as ``PeftModel.set_adapter(adapter, inference_mode=True)``
        would, in time flat in the number of adapters.

        PEFT's own switch walks every module and re-freezes every adapter's parameters (~15 ms at
        64 adapters); loaded frozen they are frozen already, so switching only sets each LoRA
        layer's active adapter.
        """
        peft = self.peft
        if peft.active_adapter == adapter:
            return
        if not self.layers:
            peft.set_adapter(adapter, inference_mode=True)
            return
        active = [adapter]
        for layer in self.layers:
            layer._active_adapter = active
        peft.active_adapter = adapter
        peft.base_model.active_adapter = adapter

    def reset(self) -> None:
        """Undo what research code may have done to the switches: adapters merged into the base
        weights (``merge_adapter``) are unmerged, layers turned off (``disable_adapter_layers``)
        are on again; the active adapter stays as it was last set."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in self.layers or [m for m in submodules(self.peft) if isinstance(m, BaseTunerLayer)]:
            if layer.merged:
                layer.unmerge()
            layer._disable_adapters = False

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """The bare base: like ``PeftModel.disable_adapter()``, whose status check and re-enable walk
        every adapter's parameters, by flipping each LoRA layer's switch."""
        if not self.layers:
            with self.peft.disable_adapter():
                yield
            return
        for layer in self.layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer._disable_adapters = False

    @contextlib.contextmanager
    def mixed(self, names: list[str]) -> Iterator[dict[str, Any]]:
        """Rows of several adapters (``names``: each row's, ``BASE_ROW`` for the bare base) in one
        pass; yields the extra keyword arguments of the model call.

        PEFT's way (``adapter_names=names``) walks every module twice per pass to check the names
        and hook the LoRA layers, then each layer gathers and scatters every adapter's rows by index
        lists. Here, with plain LoRA layers, the base runs with adapters off and a hook on each LoRA
        layer adds each adapter's output to its rows: a slice where they follow each other (the
        caller's order decides; inference keeps a member's rows together), else an index list as
        PEFT's. The same sums as PEFT's, row by row. A layer with merged adapters (research code
        may merge) goes to PEFT, which refuses it.
        """
        if not self._plain or any(layer.merged for layer in self.layers):
            try:
                yield {"adapter_names": names}
            except BaseException:
                _drop_peft_row_hooks(self.peft)
                raise
            return
        where: list[tuple[str, slice | list[int]]] = []
        for name in dict.fromkeys(names):
            if name != BASE_ROW:
                rows = [i for i, n in enumerate(names) if n == name]
                together = rows[-1] - rows[0] + 1 == len(rows)
                where.append((name, slice(rows[0], rows[-1] + 1) if together else rows))
        hook = functools.partial(_add_rows, where=where)
        handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in self.layers]
        try:
            with self.off():
                yield {}
        finally:
            for handle in handles:
                handle.remove()


def _add_rows(
    layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor,
    where: list[tuple[str, slice | list[int]]],
) -> torch.Tensor:
    """A LoRA layer's forward hook: each adapter's output added to its rows of the base layer's
    output (a slice, or an index list for rows apart), as PEFT's mixed-batch forward adds it."""
    x = args[0] if args else kwargs["x"]
    for name, rows in where:
        if name not in layer.lora_A:  # an adapter that does not reach this layer
            continue
        lora_a = layer.lora_A[name]
        sub = x[rows].to(lora_a.weight.dtype)
        delta = layer.lora_B[name](lora_a(layer.lora_dropout[name](sub))) * layer.scaling[name]
        out[rows] += delta.to(out.dtype)
    return out


def _plain_linear(layer: Any) -> bool:
    from peft.tuners.lora.layer import Linear

    return (
        type(layer) is Linear
        and not getattr(layer, "lora_variant", None)
        and not any(getattr(layer, "use_dora", {}).values())
    )


def _tuner_layers(peft: Any) -> tuple[list[Any], bool]:
    """The PEFT model's adapter layers, and whether it has auxiliary modules (such as
    ``modules_to_save``), with which a switch needs PEFT's full walk."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers, auxiliary = [], False
    for module in submodules(peft):
        auxiliary = auxiliary or isinstance(module, AuxiliaryTrainingWrapper)
        if isinstance(module, BaseTunerLayer):
            layers.append(module)
    return layers, auxiliary


def _drop_peft_row_hooks(peft: Any) -> None:
    """Remove the row hooks a failed PEFT mixed pass left behind: PEFT adds them before the pass
    and removes them after it, but not when the pass raises, and a hook left there makes every
    later pass of the model fail on its row count."""
    for module in submodules(peft):
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(getattr(hook, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook":
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
