"""Train the shipped demo models from the Python standard library's own source.

gpugroups must work with no model hub, so it ships small real models, made here:

* a byte-level BPE tokenizer (2,048 tokens) shared by all of them;
* ``pycode-base``: a tiny Llama (~2M parameters) trained on the stdlib's non-test modules;
* two LoRA adapters on it, each fine-tuned on a different slice of the text so that
  switching adapters visibly changes the next-token predictions:
  ``pycode-tests`` on the stdlib's ``test/test_*.py`` (unittest style, ``self.assert...``)
  and ``pycode-docs`` on the docstrings and comments of the modules (English prose);
* ``tinygpt2``: an independent tiny GPT-2 (~1M parameters), a second architecture.

Every stage runs a fixed number of steps from fixed seeds, so a rerun on the same machine
gives the same weights as far as torch allows; each stage also has a wall-clock share of
``--minutes`` and stops early (saying so) when it runs out, so a busy machine still ends
in time. Weights are stored as bfloat16 to keep the package small. A summary of the run
(seconds, losses, sizes, example predictions) is printed and written to ``training.json``.

    .venv/bin/python scripts/train_demo_models.py --out gpugroups/demo --minutes 10
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import shutil
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

EOS = "<|endoftext|>"
VOCAB_SIZE = 2048
SEQ_LEN = 128
BATCH = 8  # more, smaller steps learn more per second than fewer large ones here
SEED = 1234

#: Prompts printed (and recorded) for every model at the end of the run.
PROMPTS = [
    "def __init__(self",
    "import os\nimport",
    "    for key, value in items",
    "        self.assert",
    "If the file",
    "The default is",
]


@dataclass
class Stage:
    """One training run: how many steps, at what peak learning rate, with what share of the time."""

    steps: int
    lr: float
    time_share: float


STAGES = {
    "pycode-base": Stage(steps=1800, lr=3e-3, time_share=0.50),
    "pycode-tests": Stage(steps=400, lr=5e-3, time_share=0.10),
    "pycode-docs": Stage(steps=400, lr=5e-3, time_share=0.10),
    "tinygpt2": Stage(steps=1000, lr=3e-3, time_share=0.18),
}


# ---- text -------------------------------------------------------------------------------
def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The stdlib's module sources and its unittest files, sorted (a fixed subset of each)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    # Tests are their own slice; the codec tables and pydoc's help text are not code.
    skip = ("site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data")
    modules = sorted(
        p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)
    )
    tests = sorted((root / "test").glob("test_*.py"))
    # A few MB of each: more text than a few minutes of training can see once.
    return modules[:600], tests[:400]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def prose_of(source: str) -> list[str]:
    """The docstrings (cleaned) and comment blocks (without ``#``) of one module's source."""
    out: list[str] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return out
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                out.append(doc)
    block: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and not tok.string.startswith("#!"):
                block.append(tok.string.lstrip("#").strip())
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE) and block:
                text = " ".join(b for b in block if b)
                if len(text) > 40:
                    out.append(text)
                block = []
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


# ---- tokenizer --------------------------------------------------------------------------
def train_tokenizer(texts: list[str], out: Path, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE saved so that ``AutoTokenizer.from_pretrained(out)`` loads it.

    ``<|endoftext|>`` is the first token (id 0) and serves as bos, eos, pad and unk. The test
    suite's tiny models use it too (``tests/tinymodels.py``).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=512,
    )
    save_tokenizer(fast, out)
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Save the tokenizer under a class name that transformers 4 and 5 both load.

    transformers 5 writes its own ``TokenizersBackend``, unknown to transformers 4; there,
    ``PreTrainedTokenizerFast`` is the same tokenizer under its older name.
    """
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts as one long stream of token ids, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ---- training ---------------------------------------------------------------------------
def train(
    name: str, model: torch.nn.Module, stream: torch.Tensor, stage: Stage, seconds: float
) -> dict[str, float | int | bool]:
    """Train on random windows of ``stream`` until ``stage.steps`` or ``seconds``, whichever comes first.

    The learning rate warms up, then follows a cosine of the progress, the larger of the step
    fraction and the time fraction: on a busy machine the run ends early but still anneals.
    """
    gen = torch.Generator().manual_seed(SEED)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, stage.steps // 20)
    model.train()
    start = time.monotonic()
    first = float("nan")
    recent: list[float] = []
    step, progress = 0, 0.0
    while progress < 1.0:
        step += 1
        progress = max(step / stage.steps, (time.monotonic() - start) / seconds)
        for group in opt.param_groups:
            group["lr"] = stage.lr * min(1.0, step / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=gen)
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if step == 1:
            first = loss.item()
        if step % 50 == 0:
            print(f"  {name} step {step}/{stage.steps} loss {sum(recent) / len(recent):.3f} "
                  f"({time.monotonic() - start:.0f}s)", flush=True)
    if step < stage.steps:
        print(f"  {name}: time share of {seconds:.0f}s spent, stopped at step {step}", flush=True)
    model.eval()
    return {
        "steps": step,
        "stopped_early": step < stage.steps,
        "seconds": round(time.monotonic() - start, 1),
        "loss_first": round(first, 3),
        "loss_last20": round(sum(recent) / len(recent), 3),
    }


def top_predictions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, prompt: str, k: int = 5) -> list[list]:
    """The ``k`` likeliest next tokens after ``prompt`` as ``[text, probability]`` pairs."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [[tokenizer.decode([i]), round(p, 3)] for p, i in zip(top.values.tolist(), top.indices.tolist())]


def save_bf16(model: PreTrainedModel, folder: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """Save a model as bfloat16 safetensors, with the shared tokenizer next to it."""
    model.to(torch.bfloat16).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)


def make_portable(adapter_folder: Path) -> None:
    """Name the base neutrally in a saved adapter and drop peft's generated model card.

    peft records the absolute path of the base it was trained on (in the config and in a
    boilerplate README.md); the package must not carry this machine's paths. The target
    modules are sorted so that reruns write the same file.
    """
    cfg_path = adapter_folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "pycode-base"
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (adapter_folder / "README.md").unlink(missing_ok=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- the run ----------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpugroups/demo"), help="demo folder to write")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for the whole run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    budget = args.minutes * 60
    run_start = time.monotonic()
    out: Path = args.out.resolve()
    base_dir, gpt2_dir = out / "pycode-base", out / "tinygpt2"
    adapter_dirs = {"pycode-tests": out / "adapters" / "pycode-tests", "pycode-docs": out / "adapters" / "pycode-docs"}
    for d in [base_dir, gpt2_dir, *adapter_dirs.values()]:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)

    module_files, test_files = stdlib_files()
    modules = [read(p) for p in module_files]
    slices = {
        "pycode-tests": [read(p) for p in test_files],
        "pycode-docs": [doc for text in modules for doc in prose_of(text)],
    }
    print(f"corpus: {len(modules)} modules, {len(test_files)} test files, "
          f"{len(slices['pycode-docs'])} docstrings/comment blocks", flush=True)

    t = time.monotonic()
    tokenizer = train_tokenizer(modules, base_dir)
    base_stream = token_stream(tokenizer, modules)
    streams = {k: token_stream(tokenizer, v) for k, v in slices.items()}
    print(f"tokenizer: {len(tokenizer)} tokens in {time.monotonic() - t:.0f}s; stream tokens: base "
          f"{len(base_stream):,}, " + ", ".join(f"{k} {len(v):,}" for k, v in streams.items()), flush=True)

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    report: dict[str, dict] = {}

    torch.manual_seed(SEED)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, **special,
    ))
    print(f"pycode-base: Llama, {base.num_parameters():,} parameters", flush=True)
    report["pycode-base"] = train("pycode-base", base, base_stream, STAGES["pycode-base"],
                                  budget * STAGES["pycode-base"].time_share)
    report["pycode-base"]["parameters"] = base.num_parameters()
    save_bf16(base, base_dir, tokenizer)

    for name, folder in adapter_dirs.items():
        # Each adapter starts from the saved (bf16-rounded) base, as users will load it.
        torch.manual_seed(SEED)
        frozen = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        lora = get_peft_model(frozen, LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        print(f"{name}: LoRA r=8, {trainable:,} trainable parameters", flush=True)
        report[name] = train(name, lora, streams[name], STAGES[name], budget * STAGES[name].time_share)
        report[name]["parameters"] = trainable
        lora.save_pretrained(folder)
        make_portable(folder)

    torch.manual_seed(SEED)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=128, n_layer=4, n_head=4, **special,
    ))
    print(f"tinygpt2: GPT-2, {gpt2.num_parameters():,} parameters", flush=True)
    report["tinygpt2"] = train("tinygpt2", gpt2, base_stream, STAGES["tinygpt2"],
                               budget * STAGES["tinygpt2"].time_share)
    report["tinygpt2"]["parameters"] = gpt2.num_parameters()
    save_bf16(gpt2, gpt2_dir, tokenizer)

    # Predictions of the models as shipped (bf16 files, loaded with the defaults).
    shipped = {"pycode-base": AutoModelForCausalLM.from_pretrained(base_dir)}
    for name, folder in adapter_dirs.items():
        shipped[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
    shipped["tinygpt2"] = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    for name, model in shipped.items():
        model.eval()
        report[name]["predictions"] = {p: top_predictions(model, tokenizer, p) for p in PROMPTS}

    sizes = {"pycode-base": folder_bytes(base_dir), "tinygpt2": folder_bytes(gpt2_dir)}
    sizes.update({name: folder_bytes(folder) for name, folder in adapter_dirs.items()})
    total = sum(sizes.values())
    for name, size in sizes.items():
        report[name]["bytes"] = size
    summary = {
        "command": f"scripts/train_demo_models.py --out {args.out} --minutes {args.minutes:g}",
        "seconds": round(time.monotonic() - run_start, 1),
        "total_bytes": total,
        "torch": torch.__version__,
        "models": report,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

    print(f"\ndone in {summary['seconds']:.0f}s; total size {total / 1e6:.2f} MB "
          f"({'OK' if total <= 20e6 else 'OVER the 20 MB limit'})")
    for name, r in report.items():
        print(f"{name}: {r['parameters']:,} params, {r['bytes'] / 1e6:.2f} MB, {r['steps']} steps in "
              f"{r['seconds']:.0f}s, loss {r['loss_first']:.2f} -> {r['loss_last20']:.2f}")
        for prompt, preds in r["predictions"].items():
            print(f"    {prompt!r:30} " + "  ".join(f"{tok!r} {p:.2f}" for tok, p in preds))
    if total > 20e6:
        raise SystemExit("demo models exceed 20 MB")


if __name__ == "__main__":
    main()
