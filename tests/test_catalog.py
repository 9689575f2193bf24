"""The catalog: TOML files, Python registration, folders under roots, and the local HF cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpugroups.catalog import Catalog
from gpugroups.errors import GpuGroupsError
from gpugroups.localfiles import hf_hub_cache, scan_folders, scan_hf_cache


def error(call) -> GpuGroupsError:
    with pytest.raises(GpuGroupsError) as err:
        call()
    return err.value


def model_folder(path: Path, config: dict | None = None) -> Path:
    """A folder that looks like a model to the catalog (it only needs a config.json)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


# ---- TOML -----------------------------------------------------------------------------
def test_tiny_catalog_toml_registers_both_groups(tiny_catalog_toml, tiny_llama, tiny_adapters, tiny_gpt2):
    cat = Catalog(roots=[])
    added = cat.load_toml(tiny_catalog_toml)
    assert [g.id for g in added] == ["tiny", "gpt"]
    tiny, gpt = cat.group("tiny"), cat.group("gpt")
    assert (tiny.kind, tiny.base, tiny.members) == ("adapters", "tiny-base", ["tiny-base", "tiny-a", "tiny-b"])
    assert (gpt.kind, gpt.members) == ("models", ["tiny-gpt2"])
    assert [cat.model(m).role for m in tiny.members] == ["base", "adapter", "adapter"]
    assert cat.model("tiny-base").source == str(tiny_llama)
    assert cat.model("tiny-b").source == str(tiny_adapters["tiny-b"])
    assert cat.group_of("tiny-gpt2") is gpt and cat.local_path(cat.model("tiny-gpt2").source) == tiny_gpt2
    assert tiny_catalog_toml.parent in cat.roots
    assert cat.to_json()["models"][0] == {"id": "tiny-base", "group_id": "tiny", "role": "base"}


def test_relative_paths_resolve_against_the_file_and_roots_are_added(tmp_path):
    model_folder(tmp_path / "models" / "base")
    model_folder(tmp_path / "models" / "plain")
    (tmp_path / "models" / "lora").mkdir()
    toml = tmp_path / "conf" / "gpugroups.toml"
    toml.parent.mkdir()
    toml.write_text(
        'roots = ["../data", "/abs/root"]\n'
        "[groups.g]\n"
        'base = "../models/base"\n'
        'adapters = { lora = "./../models/lora" }\n'
        "[groups.m]\n"
        'models = { plain = "../models/plain", hub = "org/name" }\n'
        'dtype = "bfloat16"\n'
    )
    cat = Catalog(roots=[])
    cat.load_toml(toml)
    assert cat.model("../models/base").source == str(tmp_path / "models" / "base")
    assert cat.model("lora").source == str(tmp_path / "models" / "lora")
    assert cat.model("plain").source == str(tmp_path / "models" / "plain")
    assert cat.model("hub").source == "org/name"  # a hub id stays one, resolved from the cache at load
    assert cat.group("m").dtype == "bfloat16" and cat.group("g").kind == "adapters"
    assert cat.roots == [toml.parent, (tmp_path / "data").resolve(), Path("/abs/root")]


@pytest.mark.parametrize(
    ("text", "line", "named"),
    [
        ('roots = []\nextra = 1\n', 2, "'extra'"),
        ('[groups.a]\nmodels = ["x"]\n\n[groups.b]\nmodels = ["y"]\nbasee = "z"\n', 6, "'basee'"),
        ('[groups.a]\nkind = "models"\nmodels = ["x"]\nkind_of = 3\n', 4, "'kind_of'"),
    ],
    ids=["top-level", "in-second-group", "after-kind"],
)
def test_unknown_keys_name_their_line(tmp_path, text, line, named):
    toml = tmp_path / "gpugroups.toml"
    toml.write_text(text)
    err = error(lambda: Catalog(roots=[]).load_toml(toml))
    assert err.code == "invalid_catalog"
    assert f"{toml}:{line}:" in err.message and named in err.message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[groups.a\n", "gpugroups.toml"),
        ("groups = 3\n", "groups must be a table"),
        ('[groups.a]\nkind = "single"\nmodels = ["x"]\n', "kind must be"),
        ('[groups.a]\nkind = "adapters"\nmodels = ["x"]\n', "adapters group needs 'base'"),
        ('[groups.a]\nmodels = ["x"]\ndtype = "int4"\n', "dtype must be one of"),
        ('[groups.a]\nmodels = []\n', "has no models"),
        ("roots = 'one'\n", "roots must be a list"),
        ('[groups.a]\nmodels = ["x"]\ntrust_remote_code = "false"\n', "trust_remote_code must be a bool, got str"),
        ('[groups.a]\nmodels = ["x"]\nname = 123\n', "name must be a str, got int"),
    ],
    ids=["syntax", "groups-not-table", "bad-kind", "adapters-without-base", "bad-dtype", "empty", "roots-str",
         "trust-remote-code-str", "name-int"],
)
def test_malformed_catalogs_are_invalid_catalog(tmp_path, text, fragment):
    toml = tmp_path / "gpugroups.toml"
    toml.write_text(text)
    err = error(lambda: Catalog(roots=[]).load_toml(toml))
    assert err.code == "invalid_catalog" and fragment in err.message


def test_dtypes_by_the_names_people_write(tmp_path):
    """Hugging Face's and PyTorch's dtype names, the short ones and ``auto`` are accepted and kept
    canonical, in a TOML file and in the Manager; others are refused with the list."""
    import torch

    from gpugroups.engine.manager import Manager

    for given, kept in (("bf16", "bfloat16"), ("half", "float16"), ("fp32", "float32"), ("auto", None)):
        toml = tmp_path / f"{given}.toml"
        toml.write_text(f'[groups.g-{given}]\nmodels = ["x"]\ndtype = "{given}"\n')
        assert Catalog(roots=[]).load_toml(toml)[0].dtype == kept
    for given, kept in ((torch.float16, "float16"), ("bfloat16", "bfloat16"), ("auto", None), (None, None)):
        with Manager(devices="cpu", catalog=[], dtype=given, progress=False) as m:
            assert m.dtype == kept
    err = error(lambda: Manager(devices="cpu", catalog=[], dtype="int8"))
    assert err.code == "invalid_request" and "bf16" in err.message and "'int8'" in err.message


def test_a_syntax_error_names_the_file_and_line(tmp_path):
    toml = tmp_path / "gpugroups.toml"
    toml.write_text('[groups.a]\nmodels = ["x"]\n[groups.b\n')
    err = error(lambda: Catalog(roots=[]).load_toml(toml))
    assert err.code == "invalid_catalog" and err.message.startswith(f"{toml}:3: ")


def test_a_malformed_working_directory_catalog_is_an_error_not_skipped(tmp_path, monkeypatch):
    import gpugroups as gg

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUGROUPS_CATALOG", raising=False)
    (tmp_path / "gpugroups.toml").write_text('[groups.mine]\nmodels = ["x"]\nbsae = "y"\n')
    err = error(lambda: gg.Manager(devices="cpu"))
    assert err.code == "invalid_catalog" and f"{tmp_path / 'gpugroups.toml'}:3:" in err.message


def test_missing_catalog_file_is_invalid_catalog(tmp_path):
    err = error(lambda: Catalog(roots=[]).load_toml(tmp_path / "nope.toml"))
    assert err.code == "invalid_catalog" and "nope.toml" in err.message


# ---- duplicates -----------------------------------------------------------------------
def test_duplicate_group_ids_name_the_id(tmp_path):
    cat = Catalog(roots=[])
    cat.register_group("same", models=["m1"])
    err = error(lambda: cat.register_group("same", models=["m2"]))
    assert err.code == "invalid_catalog" and "'same'" in err.message
    assert "m2" not in cat.models  # a refused group leaves nothing behind
    toml = tmp_path / "gpugroups.toml"
    toml.write_text('[groups.twice]\nmodels = ["a"]\n[groups.twice]\nmodels = ["b"]\n')
    err = error(lambda: Catalog(roots=[]).load_toml(toml))
    assert err.code == "invalid_catalog" and "twice" in err.message and f"{toml}:3:" in err.message


def test_duplicate_model_ids_name_the_id_and_both_groups(tmp_path):
    cat = Catalog(roots=[])
    cat.register_group("first", models={"shared": "org/a"})
    err = error(lambda: cat.register_group("second", models={"shared": "org/b"}))
    assert err.code == "invalid_catalog" and "'shared'" in err.message and "'first'" in err.message
    err = error(lambda: cat.register_group("third", base="org/base", adapters={"org/base": "org/lora"}))
    assert "'org/base'" in err.message and "third" not in cat.groups
    toml = tmp_path / "gpugroups.toml"
    toml.write_text('[groups.x]\nmodels = ["dup"]\n[groups.y]\nmodels = ["dup"]\n')
    cat = Catalog(roots=[])
    err = error(lambda: cat.load_toml(toml))
    assert err.code == "invalid_catalog" and f"{toml}:3:" in err.message and "'dup'" in err.message
    # A broken file adds nothing, so the fixed file loads into the same catalog.
    assert cat.groups == {} and cat.models == {} and cat.roots == []
    toml.write_text('[groups.x]\nmodels = ["dup"]\n[groups.y]\nmodels = ["other"]\n')
    assert [g.id for g in cat.load_toml(toml)] == ["x", "y"]


# ---- Python registration --------------------------------------------------------------
def test_register_group_from_python(tmp_path):
    base = model_folder(tmp_path / "base")
    cat = Catalog(roots=[])
    g = cat.register_group("ad", base=str(base), adapters={"l1": str(tmp_path / "l1")}, name="Adapters")
    assert (g.kind, g.name, g.base, g.members) == ("adapters", "Adapters", str(base), [str(base), "l1"])
    m = cat.register_group("pair", models={"one": "org/one", "two": "org/two"}, dtype="float16")
    assert (m.kind, m.members, m.base, m.dtype) == ("models", ["one", "two"], None, "float16")
    listed = cat.register_group("listed", models=["org/three", "org/four"])
    assert [cat.model(i).source for i in listed.members] == ["org/three", "org/four"]
    single = cat.register_group("lone", models="org/five")
    assert single.members == ["org/five"]
    assert cat.register_group("named-base", base="org/b", base_id="b").members == ["b"]
    assert error(lambda: cat.register_group("both", base="x", models=["y"])).code == "invalid_catalog"
    assert error(lambda: cat.register_group("", models=["y"])).code == "invalid_catalog"
    assert error(lambda: cat.register_group("bad", models={"z": ""})).code == "invalid_catalog"


def test_python_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = model_folder(tmp_path / "models" / "my-ckpt")
    base = model_folder(tmp_path / "models" / "base")
    cat = Catalog(roots=[])
    cat.register_group("mine", models={"m": "models/my-ckpt", "hub": "org/name"})
    assert cat.model("m").source == str(ckpt)
    assert cat.model("hub").source == "org/name"  # no such folder here: a hub id
    g = cat.register_group("ad", base="models/base", base_id="my-base", adapters={"l": "models/lora"})
    assert (g.base, g.members) == ("my-base", ["my-base", "l"])
    assert cat.model("my-base").source == str(base)
    assert cat.model("l").source == "models/lora"  # not there (yet): a hub id, as for m.load


def test_toml_relative_paths_ignore_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_folder(tmp_path / "models" / "cwd-only")
    toml = tmp_path / "conf" / "gpugroups.toml"
    toml.parent.mkdir()
    toml.write_text('[groups.g]\nmodels = { x = "models/cwd-only" }\n')
    cat = Catalog(roots=[])
    cat.load_toml(toml)
    assert cat.model("x").source == "models/cwd-only"


# ---- folders and roots ----------------------------------------------------------------
def test_folder_under_a_root_is_a_single_group_registered_only_when_adopted(tmp_path):
    folder = model_folder(tmp_path / "root" / "ckpt-7")
    cat = Catalog(roots=[tmp_path / "root"])
    g = cat.group_of(str(folder))
    assert (g.id, g.kind, g.members) == (f"single:{folder}", "single", [str(folder)])
    assert cat.groups == {} and cat.models == {}  # asking registers nothing
    assert cat.model(str(folder)).source == str(folder)
    registered, forgotten = cat.adopt(g)
    assert registered is g and forgotten == []
    assert cat.group(f"single:{folder}") is g and cat.group_of(str(folder)) is g
    other = model_folder(tmp_path / "root" / "ckpt-8")
    assert cat.group(f"single:{other}").members == [str(other)]


def test_every_spelling_of_a_folder_is_one_model(tmp_path):
    root = tmp_path / "root"
    folder = model_folder(root / "ckpt")
    (root / "alias").symlink_to(folder, target_is_directory=True)
    cat = Catalog(roots=[root])
    g, _ = cat.adopt(cat.group_of(str(folder)))
    for spelling in (f"{folder}/", f"{folder}/./.", f"{root}/ckpt/../ckpt", str(root / "alias") + "//"):
        model, group = cat.resolve(spelling)
        assert (model.id, group) == (str(folder), g), spelling
    assert list(cat.groups) == [g.id]


def test_a_folder_a_group_names_is_that_group_under_any_id(tmp_path):
    folder = model_folder(tmp_path / "root" / "ckpt")
    cat = Catalog(roots=[tmp_path / "root"])
    cat.register_group("named", models={"m": str(folder)})
    assert cat.resolve(f"{folder}/.")[1].id == "named"


def test_adhoc_groups_are_bounded_oldest_unused_forgotten_first(tmp_path):
    folders = [model_folder(tmp_path / "root" / f"m{i}") for i in range(5)]
    cat = Catalog(roots=[tmp_path / "root"], max_adhoc_groups=2)
    in_use = {f"single:{folders[0]}"}
    forgotten_all = []
    for f in folders:
        _, forgotten = cat.adopt(cat.group_of(str(f)), lambda gid: gid in in_use)
        forgotten_all += forgotten
    assert forgotten_all == [f"single:{f}" for f in folders[1:4]]
    assert sorted(cat.groups) == sorted([f"single:{folders[0]}", f"single:{folders[4]}"])
    cat.forget(f"single:{folders[4]}")
    assert list(cat.groups) == [f"single:{folders[0]}"] and str(folders[4]) not in cat.models


@pytest.mark.parametrize("model_id", ["~nosuchuser-gpugroups", "./" + "x" * 300, "/" + "y" * 300 + "/z", "a\x00b"])
def test_ids_the_system_cannot_look_up_are_unknown_models(tmp_path, monkeypatch, model_id):
    monkeypatch.chdir(tmp_path)
    cat = Catalog(roots=[tmp_path])
    assert error(lambda: cat.group_of(model_id)).code == "unknown_model"
    assert error(lambda: cat.group("single:" + model_id)).code == "unknown_model"


def test_paths_outside_the_roots_are_unknown_and_never_read(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = model_folder(tmp_path / "secret")
    (root / "link").symlink_to(outside, target_is_directory=True)
    cat = Catalog(roots=[root])
    for model_id in (str(outside), f"{root}/../secret", str(root / "link"), "/etc", "/no/such/folder"):
        err = error(lambda: cat.group_of(model_id))
        assert err.code == "unknown_model", model_id
        assert "config" not in err.message  # the answer does not reveal what the folder holds
    assert cat.groups == {} and cat.models == {}
    assert error(lambda: cat.group(f"single:{outside}")).code == "unknown_model"


def test_folder_without_config_is_invalid_model(tmp_path):
    (tmp_path / "root" / "empty").mkdir(parents=True)
    cat = Catalog(roots=[tmp_path / "root"])
    err = error(lambda: cat.group_of(str(tmp_path / "root" / "empty")))
    assert err.code == "invalid_model" and "config.json" in err.message
    assert cat.groups == {}


def test_an_adapter_folder_loaded_as_a_model_says_how_to_load_it(models_root, tiny_adapters):
    cat = Catalog(roots=[models_root])
    err = error(lambda: cat.group_of(str(tiny_adapters["tiny-a"])))
    assert err.code == "invalid_model" and "is a PEFT adapter" in err.message and "register_group(" in err.message
    assert cat.groups == {}


def test_unknown_ids_and_groups(tmp_path):
    cat = Catalog(roots=[tmp_path])
    assert error(lambda: cat.group_of("not a model id!")).code == "unknown_model"
    for bad in (
        lambda: cat.group_of(""), lambda: cat.group_of(None), lambda: cat.group(5), lambda: cat.model("x" * 5000)
    ):
        assert error(bad).code == "invalid_request" and "must be a non-empty string" in error(bad).message
    assert "5000 characters" in error(lambda: cat.model("x" * 5000)).message  # not the id echoed back
    assert error(lambda: cat.group("nope")).code == "unknown_group"
    assert error(lambda: cat.local_path(str(tmp_path / "gone"))).code == "unknown_model"


def test_unknown_ids_suggest_close_matches_and_how_to_list(tmp_path):
    cat = Catalog(roots=[tmp_path])
    cat.register_group("pycode", base="org/base", base_id="pycode-base", adapters={"pycode-tests": "org/t"})
    err = error(lambda: cat.group_of("pycode-test"))
    assert err.code == "unknown_model" and "Did you mean 'pycode-tests', 'pycode-base'?" in err.message
    assert "m.state()['models']" in err.message and "m.discover()" in err.message
    assert "GET /api/v2/models" in err.message
    err = error(lambda: cat.group("pycod"))
    assert err.code == "unknown_group" and "Did you mean 'pycode'?" in err.message
    assert "m.state()['groups']" in err.message and "GET /api/v2/groups" in err.message
    far = error(lambda: cat.group_of("zzz-unrelated"))
    assert "Did you mean" not in far.message and "m.state()['models']" in far.message


def test_scan_folders_finds_model_folders_to_a_depth(tmp_path):
    a = model_folder(tmp_path / "a")
    b = model_folder(tmp_path / "x" / "b")
    model_folder(tmp_path / "x" / "y" / "z" / "too-deep")
    (tmp_path / "x" / "not-a-model").mkdir()
    model_folder(tmp_path / ".hidden")
    assert scan_folders([tmp_path], depth=2) == sorted([str(a), str(b)])


# ---- Hugging Face cache ---------------------------------------------------------------
def cached_repo(cache: Path, repo_id: str, files: dict[str, str], revision: str = "a" * 40) -> Path:
    """Lay out one repo exactly as huggingface_hub does: blobs, refs/main, snapshot symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for i, (name, text) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_text(text)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_hf_cache_models_are_found_and_resolved_without_network(tmp_path, monkeypatch, variable):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    monkeypatch.setenv(variable, str(cache if variable == "HF_HUB_CACHE" else tmp_path))
    assert hf_hub_cache() == cache
    snapshot = cached_repo(cache, "org/name", {"config.json": '{"model_type": "llama"}', "README.md": "hi"})
    cached_repo(cache, "org/readme-only", {"README.md": "no config"})
    cat = Catalog()
    assert cache in cat.roots
    assert scan_hf_cache() == ["org/name"]
    g = cat.group_of("org/name")
    assert (g.id, g.kind, g.members) == ("single:org/name", "single", ["org/name"])
    assert cat.local_path(cat.model("org/name").source) == snapshot
    err = error(lambda: cat.group_of("org/not-cached"))
    assert err.code == "unknown_model" and "cache" in err.message


def test_an_empty_or_missing_cache_offers_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "never-made"))
    assert scan_hf_cache() == []


# ---- through the manager, with real tiny models ---------------------------------------
def test_manager_loads_a_group_registered_by_relative_paths(tmp_path, monkeypatch, tiny_llama, tiny_adapters, tiny_gpt2):
    import gpugroups as gg

    models = tmp_path / "models"
    models.mkdir()
    for name, src in (("my-ckpt", tiny_gpt2), ("base", tiny_llama), ("lora", tiny_adapters["tiny-a"])):
        (models / name).symlink_to(src, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    with gg.Manager(devices="cpu", catalog=[]) as m:
        m.register_group("mine", models={"m": "models/my-ckpt"})
        m.register_group("ad", base="models/base", base_id="my-base", adapters={"lora": "models/lora"})
        assert m.load("m")["group_id"] == "mine"
        assert m.process("m", "def f(", num_predictions=2)["predictions"]
        assert m.load("my-base")["group_id"] == "ad"
        assert [x["id"] for x in m.state()["models"] if x["group_id"] == "ad"] == ["my-base", "lora"]
        assert m.process("lora", "def f(", num_predictions=2)["model_id"] == "lora"


def test_manager_errors_name_close_matches(tmp_path, monkeypatch):
    import gpugroups as gg

    monkeypatch.chdir(tmp_path)
    with gg.Manager(devices="cpu") as m:  # the demo catalog
        err = error(lambda: m.load("pycode-doc"))
        assert err.code == "unknown_model" and "Did you mean 'pycode-docs'" in err.message
        err = error(lambda: m.load_group("pycde"))
        assert err.code == "unknown_group" and "Did you mean 'pycode'?" in err.message
