"""Memory estimates against what real models measure once loaded, and the ways files go bad."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpugroups.catalog import GroupSpec
from gpugroups.engine import estimate as est
from gpugroups.engine.torchkit import measured_bytes
from gpugroups.errors import GpuGroupsError
from tests import tinymodels

TOLERANCE = 0.02

#: (architecture, size, stored dtype, load dtype): tiny to ~100M parameters, fp32 and bf16 loads.
CASES = [
    *[(arch, "tiny", "float32", "float32") for arch in tinymodels.ARCHS],
    ("llama", "tiny", "float32", "bfloat16"),
    ("gemma", "tiny", "float32", "bfloat16"),
    ("phi", "small", "float32", "float32"),
    ("qwen2", "small", "float32", "bfloat16"),
    ("gpt2", "small", "float32", "float32"),
    ("llama", "100m", "bfloat16", "float32"),
]


@pytest.fixture(scope="module")
def zoo(models_root: Path, tokenizer_dir: Path):
    """Build each (arch, size, stored dtype) once for the module; returns a path getter."""
    built: dict[tuple[str, str, str], Path] = {}

    def get(arch: str, size: str = "tiny", stored: str = "float32") -> Path:
        key = (arch, size, stored)
        if key not in built:
            built[key] = tinymodels.build_causal_lm(
                models_root / f"zoo-{arch}-{size}-{stored}", arch, size, tokenizer_dir=tokenizer_dir, dtype=stored
            )
        return built[key]

    return get


def load(folder: Path, dtype: str):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


def close(estimate: int, measured: int) -> bool:
    return abs(estimate - measured) <= TOLERANCE * measured


@pytest.mark.parametrize(("arch", "size", "stored", "dtype"), CASES, ids=["-".join(c) for c in CASES])
def test_header_and_meta_estimates_match_the_loaded_model(zoo, arch, size, stored, dtype):
    folder = zoo(arch, size, stored)
    measured = measured_bytes(load(folder, dtype))
    from_header = est.weight_bytes(folder, dtype)
    from_meta = est.meta_bytes(folder, dtype)
    assert close(from_header, measured), (from_header, measured)
    assert close(from_meta, measured), (from_meta, measured)


def test_tied_heads_count_once(zoo):
    model = load(zoo("gpt2"), "float32")
    naive = sum(t.numel() * t.element_size() for t in model.state_dict(keep_vars=True).values())
    unique = measured_bytes(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert unique == naive - model.lm_head.weight.numel() * 4


def test_tied_head_stored_twice_counts_once(zoo, tmp_path):
    """Some checkpoints store a tied head beside the embedding; the loaded model holds one tensor."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "gpt2-both"
    shutil.copytree(zoo("gpt2"), folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    measured = measured_bytes(load(folder, "float32"))
    assert est.weight_bytes(folder, "float32") == measured


def test_without_safetensors_the_config_is_built_on_meta(zoo, models_root, tokenizer_dir, tmp_path):
    bin_only = tinymodels.build_causal_lm(
        models_root / "llama-bin", "llama", "small", tokenizer_dir=tokenizer_dir, safetensors=False
    )
    assert not list(bin_only.glob("*.safetensors"))
    measured = measured_bytes(load(bin_only, "float32"))
    assert close(est.weight_bytes(bin_only, "float32"), measured)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(zoo("phi", "small") / "config.json", config_only / "config.json")
    assert close(est.weight_bytes(config_only, "bfloat16"), measured_bytes(load(zoo("phi", "small"), "bfloat16")))


def test_sharded_checkpoint_follows_its_index(zoo, tmp_path):
    model = load(zoo("qwen2", "small"), "float32")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="300KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    # A stray file that the index does not name must not count.
    shutil.copy(shards[0], folder / "consolidated.safetensors")
    assert close(est.weight_bytes(folder, "float32"), measured_bytes(model))


def test_adapters_count_at_float32_as_peft_holds_them(tiny_llama, tiny_adapters):
    from peft import PeftModel

    for dtype in ("float32", "bfloat16"):
        base = load(tiny_llama, dtype)
        base_bytes = measured_bytes(base)
        peft = PeftModel.from_pretrained(base, tiny_adapters["tiny-a"], adapter_name="a", is_trainable=False)
        peft.load_adapter(tiny_adapters["tiny-b"], adapter_name="b", is_trainable=False)
        added = measured_bytes(peft) - base_bytes
        estimated = sum(est.adapter_bytes(p, dtype) for p in tiny_adapters.values())
        assert added > 0 and close(estimated, added), (dtype, estimated, added)


def group(kind: str, members: list[str], base: str | None = None) -> GroupSpec:
    return GroupSpec("g", kind, "g", members, base)


def test_estimate_group_adds_weights_adapters_reserve_and_overhead(tiny_llama, tiny_adapters):
    spec = group("adapters", ["base", "a", "b"], base="base")
    folders = {"base": tiny_llama, "a": tiny_adapters["tiny-a"], "b": tiny_adapters["tiny-b"]}
    cpu = est.estimate_group(spec, folders, "float32", "cpu")
    cuda = est.estimate_group(spec, folders, "float32", "cuda")
    config = json.loads((tiny_llama / "config.json").read_text())
    assert cpu["weights_bytes"] == est.weight_bytes(tiny_llama, "float32")
    assert cpu["adapters_bytes"] == sum(est.adapter_bytes(p, "float32") for p in tiny_adapters.values())
    assert cpu["reserve_bytes"] == est.runtime_reserve(config, "float32")
    assert cpu["overhead_bytes"] == 0 and cuda["overhead_bytes"] == est.DEVICE_OVERHEAD["cuda"] > 0
    parts = ("weights_bytes", "adapters_bytes", "reserve_bytes", "overhead_bytes")
    assert cpu["total_bytes"] == sum(cpu[k] for k in parts)
    assert cuda["total_bytes"] == cpu["total_bytes"] + est.DEVICE_OVERHEAD["cuda"]


def test_models_group_sums_weights_and_keeps_the_largest_reserve(zoo):
    small, tiny = zoo("qwen2", "small"), zoo("gpt2")
    parts = est.estimate_group(group("models", ["s", "t"]), {"s": small, "t": tiny}, "bfloat16", "virtual")
    assert parts["weights_bytes"] == est.weight_bytes(small, "bfloat16") + est.weight_bytes(tiny, "bfloat16")
    reserves = [est.runtime_reserve(json.loads((f / "config.json").read_text()), "bfloat16") for f in (small, tiny)]
    assert parts["reserve_bytes"] == max(reserves) and parts["adapters_bytes"] == 0


def test_estimate_group_refuses_an_adapter_for_another_base(zoo, tiny_adapters):
    spec = group("adapters", ["base", "a"], base="base")
    with pytest.raises(GpuGroupsError) as err:
        est.estimate_group(spec, {"base": zoo("llama", "small"), "a": tiny_adapters["tiny-a"]}, "float32", "cpu")
    assert err.value.code == "invalid_model" and "q_proj" in err.value.message


# ---- runtime reserve ------------------------------------------------------------------
LLAMA_7B = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096,
}


def test_reserve_counts_kv_activations_mask_and_logits():
    batch, seq, size = 8, 512, 2
    kv = 2 * 32 * batch * seq * 32 * 128 * size
    activations = batch * seq * (16 * 4096 + 4 * 11008) * size
    mask = batch * seq * seq  # sdpa: a boolean mask, no scores
    assert est.runtime_reserve(LLAMA_7B, "bfloat16") == kv + activations + mask + batch * 32000 * 4


def test_eager_attention_adds_the_scores_and_the_softmax():
    batch, seq, size = 8, 512, 2
    eager = est.runtime_reserve({**LLAMA_7B, "_attn_implementation": "eager"}, "bfloat16")
    scores = batch * 32 * seq * seq * (2 * size + 4) + batch * seq * seq * size
    assert eager - est.runtime_reserve(LLAMA_7B, "bfloat16") == scores - batch * seq * seq
    assert est.runtime_reserve(LLAMA_7B, "bfloat16", attention="eager") == eager
    # quadratic in the prompt: twice the tokens, four times the scores
    long = est.runtime_reserve(LLAMA_7B, "bfloat16", seq=1024, attention="eager")
    assert long - est.runtime_reserve(LLAMA_7B, "bfloat16", seq=1024) > 3.9 * (eager - est.runtime_reserve(LLAMA_7B, "bfloat16"))


def test_greedy_continuations_grow_the_kv_cache():
    more = est.runtime_reserve(LLAMA_7B, "bfloat16", new_tokens=256) - est.runtime_reserve(LLAMA_7B, "bfloat16")
    assert more == 2 * 32 * 8 * 256 * 32 * 128 * 2


def test_grouped_query_attention_shrinks_the_kv_cache():
    gqa = {**LLAMA_7B, "num_key_value_heads": 8}
    saved = est.runtime_reserve(LLAMA_7B, "float16") - est.runtime_reserve(gqa, "float16")
    assert saved == 2 * 32 * 8 * 512 * (32 - 8) * 128 * 2


def test_gpt2_style_keys_read_like_llama_keys():
    gpt2 = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None, "vocab_size": 50257, "n_positions": 1024}
    llama = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "vocab_size": 50257, "max_position_embeddings": 1024}
    assert est.runtime_reserve(gpt2, "float32") == est.runtime_reserve(llama, "float32") > 0


def test_reserve_uses_explicit_head_dim_nested_text_config_and_short_contexts():
    wide = {**LLAMA_7B, "head_dim": 256}
    assert est.runtime_reserve(wide, "bfloat16") > est.runtime_reserve(LLAMA_7B, "bfloat16")
    assert est.runtime_reserve({"text_config": LLAMA_7B}, "bfloat16") == est.runtime_reserve(LLAMA_7B, "bfloat16")
    short = {**LLAMA_7B, "max_position_embeddings": 128}
    assert est.runtime_reserve(short, "bfloat16") == est.runtime_reserve(LLAMA_7B, "bfloat16", seq=128)


def test_default_dtype():
    assert est.default_dtype("cuda", True) == "bfloat16"
    assert est.default_dtype("cuda", False) == "float16"
    assert est.default_dtype("cpu", True) == est.default_dtype("virtual", True) == "float32"


# ---- broken files ---------------------------------------------------------------------
def write_safetensors(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def test_header_lists_tensors_without_reading_their_data(tmp_path):
    """A 64 GiB sparse file: reading its data would never finish; the header alone answers."""
    n = 4 * 1024**3
    header = json.dumps({"w": {"dtype": "BF16", "shape": [n, 8], "data_offsets": [0, n * 16]},
                         "__metadata__": {"format": "pt"}}).encode()
    path = write_safetensors(tmp_path / "huge.safetensors", header)
    with path.open("r+b") as f:
        f.truncate(8 + len(header) + n * 16)
    info = est.read_safetensors_header(path)
    assert info == {"w": est.TensorInfo("BF16", [n, 8], n * 16)}
    assert info["w"].bytes_as("float32") == n * 8 * 4


@pytest.mark.parametrize(
    ("header", "data", "length", "why"),
    [
        (b"{not json", b"", None, "not JSON"),
        (b'["a list"]', b"", None, "not a JSON object"),
        (b"{}", b"", 1 << 60, "header length"),
        (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8, None, "truncated"),
        (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}', b"\0" * 16, None, "needs 16 bytes"),
        (b'{"w": {"dtype": "F32", "shape": "x"}}', b"", None, "malformed"),
    ],
    ids=["not-json", "not-object", "absurd-length", "truncated-data", "bad-offsets", "malformed-entry"],
)
def test_corrupt_headers_are_invalid_model_naming_the_file(tmp_path, header, data, length, why):
    path = write_safetensors(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(GpuGroupsError) as err:
        est.read_safetensors_header(path)
    assert err.value.code == "invalid_model"
    assert str(path) in err.value.message and why in err.value.message


def test_truncated_model_file_is_invalid_model(zoo, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(zoo("llama"), folder)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(GpuGroupsError) as err:
        est.weight_bytes(folder, "float32")
    assert err.value.code == "invalid_model" and str(weights) in err.value.message


def test_empty_file_is_invalid_model(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(GpuGroupsError) as err:
        est.read_safetensors_header(path)
    assert err.value.code == "invalid_model" and str(path) in err.value.message


def test_folder_without_config_is_invalid_model(zoo, tmp_path):
    folder = tmp_path / "no-config"
    folder.mkdir()
    shutil.copy(zoo("llama") / "model.safetensors", folder)
    for call in (lambda: est.weight_bytes(folder, "float32"), lambda: est.meta_bytes(folder, "float32")):
        with pytest.raises(GpuGroupsError) as err:
            call()
        assert err.value.code == "invalid_model" and str(folder) in err.value.message


def test_adapter_for_a_bigger_base_names_module_and_shapes(zoo, tiny_adapters):
    with pytest.raises(GpuGroupsError) as err:
        est.check_adapter_matches_base(tiny_adapters["tiny-a"], zoo("llama", "small"))
    msg = err.value.message
    assert err.value.code == "invalid_model"
    assert "model.layers.0.self_attn.q_proj" in msg and "[128, 128]" in msg and "in=32" in msg


def test_adapter_for_another_architecture_names_the_missing_module(zoo, tiny_adapters):
    with pytest.raises(GpuGroupsError) as err:
        est.check_adapter_matches_base(tiny_adapters["tiny-a"], zoo("gpt2"))
    assert err.value.code == "invalid_model" and "self_attn.q_proj" in err.value.message


def test_matching_adapters_pass_the_check(tiny_llama, tiny_adapters, zoo, models_root):
    for adapter in tiny_adapters.values():
        est.check_adapter_matches_base(adapter, tiny_llama)
    # GPT-2's Conv1D stores [in, out]; its adapter says fan_in_fan_out.
    gpt2 = zoo("gpt2")
    est.check_adapter_matches_base(tinymodels.build_lora_adapter(models_root / "gpt2-lora", gpt2, seed=5), gpt2)
