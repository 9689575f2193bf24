"""Session fixtures: tiny real models, adapters and a catalog built once per test session, and
the local Ray cluster every Ray test shares."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import raycluster, tinymodels

#: The browser tests' ``lab`` and ``browser`` fixtures (one JupyterLab per test module that asks).
pytest_plugins = ["tests.labdriver"]


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session folder all tiny models live in (use it as a catalog root)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tokenizer_dir(models_root: Path) -> Path:
    """A byte-level BPE tokenizer (~768 tokens) loadable with ``AutoTokenizer``."""
    return tinymodels.build_tokenizer(models_root / "tokenizer")


@pytest.fixture(scope="session")
def tiny_llama(models_root: Path, tokenizer_dir: Path) -> Path:
    """A tiny Llama (safetensors + tokenizer)."""
    return tinymodels.build_causal_lm(models_root / "tiny-llama", "llama", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_adapters(models_root: Path, tiny_llama: Path) -> dict[str, Path]:
    """Two LoRA adapters for ``tiny_llama`` that change its outputs differently."""
    return {
        mid: tinymodels.build_lora_adapter(models_root / mid, tiny_llama, seed=seed)
        for mid, seed in (("tiny-a", 1), ("tiny-b", 2))
    }


@pytest.fixture(scope="session")
def tiny_gpt2(models_root: Path, tokenizer_dir: Path) -> Path:
    """A tiny GPT-2 (safetensors + tokenizer)."""
    return tinymodels.build_causal_lm(models_root / "tiny-gpt2", "gpt2", tokenizer_dir=tokenizer_dir, seed=3)


@pytest.fixture(scope="session")
def deep_llama(models_root: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    """A deeper tiny Llama (8 layers, whose weights outweigh its runtime reserve: sharding tests)
    and a LoRA adapter for it."""
    base = tinymodels.build_causal_lm(
        models_root / "deep-llama", "llama", "deep", tokenizer_dir=tokenizer_dir, seed=7, context=32
    )
    return base, tinymodels.build_lora_adapter(models_root / "deep-a", base, seed=5)


@pytest.fixture(scope="session")
def tiny_catalog_toml(models_root: Path, tiny_llama: Path, tiny_adapters: dict[str, Path], tiny_gpt2: Path) -> Path:
    """A catalog file: adapters group ``tiny`` (``tiny-base``, ``tiny-a``, ``tiny-b``), models group ``gpt`` (``tiny-gpt2``)."""
    return tinymodels.catalog_toml(
        models_root / "gpugroups.toml", tiny_llama, tiny_adapters, {"tiny-gpt2": tiny_gpt2}
    )


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[raycluster.RayCluster]:
    """Two nodes of two simulated GPUs on 127.0.0.1, started on first use, shared by the session."""
    pytest.importorskip("ray")
    yield from raycluster.start()
