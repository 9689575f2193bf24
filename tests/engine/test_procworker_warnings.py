"""Warnings shown in a worker process (``worker="process"``) reach the caller, as they do with
thread workers: research code's own, and the ``HooksLeftWarning`` for hooks it left on a served
model (they were printed on the worker process's stderr, where no filter or test could see them)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

import gpugroups as gg
from gpugroups.errors import HooksLeftWarning

pytestmark = pytest.mark.timeout(300)


class OddWarning(Warning):
    """A category of the caller's own: it comes back as itself."""


def warn_twice(model: Any, tokenizer: Any) -> str:
    warnings.warn("careful", OddWarning, stacklevel=1)
    warnings.warn("plain", stacklevel=1)
    return "done"


def leave_a_hook(model: Any, tokenizer: Any) -> None:
    model.get_base_model().lm_head.register_forward_hook(lambda module, args, out: out)


def test_warnings_of_research_code_on_a_worker_process_reach_the_caller(tiny_catalog_toml: Path) -> None:
    with gg.Manager(devices="virtual:1x512MiB", catalog=tiny_catalog_toml, worker="process", progress=False) as m:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert m.run("tiny-a", warn_twice) == "done"
        assert [(w.category, str(w.message)) for w in seen] == [(OddWarning, "careful"), (UserWarning, "plain")]
        with pytest.warns(HooksLeftWarning, match=r"left 1 hook"):
            m.run("tiny-a", leave_a_hook)
