"""Where models live on this machine: the allowed roots, the Hugging Face cache, model folders.

Light on purpose (no torch): the Jupyter server may import it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import GpuGroupsError

DEMO_DIR = Path(__file__).resolve().parent / "demo"
ROOTS_ENV = "GPUGROUPS_MODEL_ROOTS"


def default_roots() -> list[Path]:
    """The working directory, the Hugging Face cache, the demo folder, and ``$GPUGROUPS_MODEL_ROOTS``."""
    roots = [Path.cwd(), hf_hub_cache(), DEMO_DIR]
    roots += [Path(r) for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r]
    return roots


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now.

    huggingface_hub reads ``HF_HUB_CACHE``/``HF_HOME`` once, when first imported; a kernel
    that sets them later (or a test) would otherwise still be pointed at the old cache.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _subdirs(root: Path, depth: int) -> list[Path]:
    if depth <= 0 or not root.is_dir():
        return []
    out = []
    try:
        children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")]
    except OSError:
        return []
    for c in children:
        out.append(c)
        out += _subdirs(c, depth - 1)
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict, or ``invalid_model`` saying which file is broken."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GpuGroupsError("invalid_model", f"{path.parent} has no {path.name}") from None
    except (OSError, ValueError) as exc:
        raise GpuGroupsError("invalid_model", f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise GpuGroupsError("invalid_model", f"{path} is not a JSON object")
    return data


def scan_hf_cache() -> list[str]:
    """Model repos in the local Hugging Face cache that have a ``config.json`` (ids only).

    They are not registered: each becomes ``single:<repo_id>`` on first use.
    """
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(hf_hub_cache())
    except Exception:  # no cache dir yet, or an unreadable one: nothing to offer
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type == "model" and any(
            (Path(rev.snapshot_path) / "config.json").exists() for rev in repo.revisions
        ):
            found.append(repo.repo_id)
    return sorted(found)

def scan_folders(roots: Iterable[str | os.PathLike[str]], depth: int = 2) -> list[str]:
    """Model folders (with ``config.json``) at most ``depth`` levels below ``roots``."""
    found = []
    for root in roots:
        root = Path(root).expanduser().resolve()
        for p in [root, *_subdirs(root, depth)]:
            if (p / "config.json").is_file():
                found.append(str(p))
    return sorted(set(found))

# ---- resolving ----------------------------------------------------------------------
