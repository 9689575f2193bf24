"""After research code (``m.run``'s function, a ``m.use`` block) had a served model in its hands:
put back what serving relies on, and say what was left that changes it.

Put back: eval mode (dropout off), the generation settings as loaded (continuations use the
model's), the adapters' switches (merged adapters unmerged, disabled layers on: ``Adapters.reset``)
and no gradients on the parameters (memory no estimate counted). Said, not undone: forward hooks
the code left on the models. They change every later answer of the group, which is how one steers
it on purpose, and a hook forgotten (an exception before ``handle.remove()``) does the same by
mistake, so the worker warns. Counting hooks walks every module; it happens only when a hook
handle was made while the code ran (torch numbers every one it makes).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch.utils.hooks

from .torchkit import submodules

if TYPE_CHECKING:
    from .runtime import Runtime


def hook_handles() -> int | None:
    """How many hook handles torch has made in this process so far (None if it does not say)."""
    return getattr(torch.utils.hooks.RemovableHandle, "next_id", None)


class Aftercare:
    """For one runtime: each model's parameters and modules, listed once (walking them is the
    costly part: ~0.3 ms for the demo model), and the hooks on them as of the last count."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._models = []
        for m in {id(m.model): m for m in rt.members.values()}.values():
            modules = submodules(m.model)
            self._models.append((m, [p for mod in modules for p in mod._parameters.values() if p is not None], modules))
        self._hooks = self._hook_ids()

    def restore(self, handles_before: int | None) -> int:
        """Put back what serving relies on; answers how many hooks the code added and left on the
        models (``handles_before``: ``hook_handles()`` when it began)."""
        for member, params, modules in self._models:
            model = member.model
            if any(mod.training for mod in modules):  # ``train()`` on any part: dropout is on there
                model.eval()
            for p in params:
                if p.grad is not None:
                    p.grad = None
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            loaded = member.generation_config  # replaced, emptied or changed: as loaded again
            if loaded is not None and getattr(getattr(inner, "generation_config", None), "__dict__", None) != vars(loaded):
                inner.generation_config = copy.deepcopy(loaded)
        if self._rt.adapters is not None:
            self._rt.adapters.reset()
        if handles_before is not None and hook_handles() == handles_before:
            return 0  # no hook was registered anywhere meanwhile
        before, self._hooks = self._hooks, self._hook_ids()
        return len(self._hooks - before)

    def hooks(self) -> int:
        """How many forward hooks are on the group's models now."""
        return len(self._hooks)

    def _hook_ids(self) -> set[int]:
        """The handles of every forward hook on the models, theirs and torch's global ones (torch
        numbers each handle once), but the libraries' own: transformers installs its output-
        capturing hooks the first time a model is asked for ``output_hidden_states`` or
        ``output_attentions`` (inert otherwise)."""
        every = [hooks for _, _, mods in self._models for mod in mods for hooks in (mod._forward_hooks, mod._forward_pre_hooks)]
        every += [_GLOBAL_HOOKS, _GLOBAL_PRE_HOOKS]  # torch's hooks on every module: on these too
        return {k for hooks in every for k, fn in hooks.items() if not getattr(fn, "__module__", "").startswith(_LIBRARIES)}


#: ``register_module_forward_hook``'s hooks (on every module of the process), by handle id.
_GLOBAL_HOOKS = torch.nn.modules.module._global_forward_hooks
_GLOBAL_PRE_HOOKS = torch.nn.modules.module._global_forward_pre_hooks

#: Packages whose own hooks on a model are part of how it runs, not research code's.
_LIBRARIES = ("transformers.", "peft.", "accelerate.")
