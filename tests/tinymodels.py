"""Tiny real Hugging Face models, tokenizers and LoRA adapters, built locally for tests.

No hub is reachable here, so tests build what they load: a byte-level BPE trained on a
slice of the Python standard library, causal LMs of several architectures made with
``AutoModelForCausalLM.from_config`` (seeded) and saved as safetensors, and PEFT LoRA
adapters whose B weights are randomised so that each adapter really changes the outputs.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path
from typing import Any

#: Per-architecture config class names and the module names a LoRA adapter targets.
ARCHS: dict[str, tuple[str, list[str]]] = {
    "llama": ("LlamaConfig", ["q_proj", "v_proj"]),
    "gpt2": ("GPT2Config", ["c_attn"]),
    "gemma": ("GemmaConfig", ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2Config", ["q_proj", "v_proj"]),
    "mistral": ("MistralConfig", ["q_proj", "v_proj"]),
    "phi": ("PhiConfig", ["q_proj", "v_proj"]),
}

#: Sizes as (hidden, layers, heads, kv_heads, intermediate). "100m" is ~100M parameters.
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (32, 2, 4, 2, 64),
    "small": (128, 4, 4, 2, 352),
    "100m": (768, 12, 12, 4, 2560),
    "deep": (256, 8, 4, 1, 1024),  # weights dominate its runtime reserve at a short context: sharding tests
    "shard": (512, 12, 8, 2, 1536),  # ~36M parameters: loads long enough to time (bench/bench_shard.py)
}


def _corpus(max_bytes: int = 300_000) -> list[str]:
    """A deterministic slice of the stdlib's own source (always present, no download)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def build_tokenizer(directory: str | Path, vocab_size: int = 768) -> Path:
    """Train the demo models' byte-level BPE on stdlib source, smaller, and save it for ``AutoTokenizer``.

    ``<|endoftext|>`` is the first token (id 0) and serves as bos, eos and pad.
    """
    from scripts.train_demo_models import train_tokenizer

    directory = Path(directory)
    train_tokenizer(_corpus(), directory, vocab_size)
    return directory


def _vocab_size(tokenizer_dir: Path) -> int:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    return len(data["model"]["vocab"]) + sum(1 for t in data["added_tokens"] if t["content"] not in data["model"]["vocab"])


def make_config(arch: str, size: str = "tiny", vocab_size: int = 768, context: int = 512):
    """The transformers config of ``arch`` at ``size`` (see ``ARCHS`` and ``SIZES``), ``context`` positions long."""
    import transformers

    hidden, layers, heads, kv_heads, inter = SIZES[size]
    cls = getattr(transformers, ARCHS[arch][0])
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if arch == "gpt2":
        return cls(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context, **ids)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=context, **ids,
    )
    if arch == "phi":
        return cls(**common)
    if arch == "gemma":
        common["head_dim"] = hidden // heads
    # Untied heads on the non-GPT-2 archs exercise the "every tensor counts" path; GPT-2 and
    # Gemma tie embeddings by default and exercise "shared tensors count once".
    tie = arch == "gemma"
    return cls(num_key_value_heads=kv_heads, tie_word_embeddings=tie, **common)


def build_causal_lm(
    directory: str | Path,
    arch: str = "llama",
    size: str = "tiny",
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    dtype: str = "float32",
    safetensors: bool = True,
    context: int = 512,
) -> Path:
    """Build a seeded random causal LM and save it (safetensors by default) with the tokenizer.

    ``safetensors=False`` saves ``pytorch_model.bin`` instead, for the estimate's fallback path.
    """
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    vocab = _vocab_size(Path(tokenizer_dir)) if tokenizer_dir else 768
    config = make_config(arch, size, vocab, context)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if safetensors:
        model.save_pretrained(directory)
    else:  # transformers 5 always writes safetensors; the legacy layout is written by hand
        directory.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    if tokenizer_dir:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, directory / f.name)
    return directory


def build_lora_adapter(
    directory: str | Path,
    base_dir: str | Path,
    seed: int,
    r: int = 4,
    target_modules: list[str] | None = None,
    scale: float = 0.5,
) -> Path:
    """A PEFT LoRA adapter of rank ``r`` on ``target_modules`` (the architecture's attention
    projections by default) for the model in ``base_dir``: ``build_peft_adapter`` with a LoraConfig."""
    from peft import LoraConfig

    model_type = json.loads((Path(base_dir) / "config.json").read_text())["model_type"]
    if target_modules is None:
        target_modules = ARCHS.get(model_type, ("", ["q_proj", "v_proj"]))[1]
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=target_modules, lora_dropout=0.0,
        fan_in_fan_out=model_type == "gpt2", task_type="CAUSAL_LM",
    )
    return build_peft_adapter(directory, base_dir, seed, config, scale)


def build_peft_adapter(directory: str | Path, base_dir: str | Path, seed: int, config: Any, scale: float = 0.5) -> Path:
    """A PEFT adapter of any kind (``config``: a PEFT config) for the model in ``base_dir`` whose
    weights really change its outputs.

    PEFT initialises most adapters to do nothing (LoRA's B to zero, IA3's vectors to ones, saved
    modules as copies of the base's); here LoRA's B is drawn from a seeded normal of std ``scale``
    and every other trainable tensor but LoRA's A gets such noise added, so two adapters with
    different seeds disagree.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(Path(base_dir)), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
            elif param.requires_grad and "lora_A" not in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(directory)
    return Path(directory)


_GATED = """\
import os
import time

from transformers import LlamaForCausalLM


class GatedLlama(LlamaForCausalLM):
    \"\"\"A Llama whose ``from_pretrained`` waits until the file ``config.gate`` exists.\"\"\"

    @classmethod
    def from_pretrained(cls, *args, config, **kwargs):
        while not os.path.exists(config.gate):
            time.sleep(0.01)
        return super().from_pretrained(*args, config=config, **kwargs)
"""


def build_gated(directory: str | Path, base_dir: str | Path, gate: str | Path) -> Path:
    """A copy of the Llama in ``base_dir`` whose load waits until the file ``gate`` exists (remote
    code: load it with ``trust_remote_code``): a load that is under way for as long as a test needs."""
    directory = Path(directory)
    shutil.copytree(base_dir, directory)
    (directory / "modeling_gated.py").write_text(_GATED, encoding="utf-8")
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config.update(auto_map={"AutoModelForCausalLM": "modeling_gated.GatedLlama"}, gate=str(gate))
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def catalog_toml(path: str | Path, base: Path, adapters: dict[str, Path], models: dict[str, Path]) -> Path:
    """Write a catalog TOML: adapters group ``tiny`` (base id ``tiny-base``) and models group ``gpt``."""
    lines = [
        "[groups.tiny]",
        'kind = "adapters"',
        'name = "Tiny Llama + LoRA"',
        f"base = {json.dumps(str(base))}",
        'base_id = "tiny-base"',
        "[groups.tiny.adapters]",
        *[f"{json.dumps(mid)} = {json.dumps(str(p))}" for mid, p in adapters.items()],
        "",
        "[groups.gpt]",
        'kind = "models"',
        'name = "Tiny GPT-2"',
        "[groups.gpt.models]",
        *[f"{json.dumps(mid)} = {json.dumps(str(p))}" for mid, p in models.items()],
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
