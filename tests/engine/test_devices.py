"""Device specs: sizes, virtual devices, the cpu fallback, and NVML without a GPU."""

from __future__ import annotations

import pytest

from gpugroups.engine.devices import detect, parse_size
from gpugroups.errors import GpuGroupsError


@pytest.mark.parametrize(
    "text, expected",
    [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("300000000B", 300_000_000), ("1.5GB", 1_500_000_000), ("4 KiB", 4096)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12", "2 parsecs", "-1GiB", "GiB"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(GpuGroupsError) as e:
        parse_size(text)
    assert e.value.code == "invalid_request"


def test_virtual_devices_get_ids_names_and_budgets():
    devs = detect("virtual:3x512MiB")
    assert [(d.device_id, d.device, d.kind, d.backing) for d in devs] == [
        (0, "virtual:0", "virtual", "cpu"), (1, "virtual:1", "virtual", "cpu"), (2, "virtual:2", "virtual", "cpu")
    ]
    mem = devs[1].memory(100 * 2**20)
    assert mem["budget_bytes"] == mem["total_bytes"] == 512 * 2**20
    assert mem["used_bytes"] == mem["manager_bytes"] == 100 * 2**20
    assert mem["free_bytes"] == 412 * 2**20 and mem["other_bytes"] == 0


def test_a_list_of_specs_numbers_devices_in_order():
    devs = detect(["cpu", "virtual:2x1GiB", "virtual:300000000B"])
    assert [d.device for d in devs] == ["cpu", "virtual:1", "virtual:2", "virtual:3"]
    assert devs[3].total_bytes == 300_000_000


def test_auto_without_a_gpu_is_one_cpu_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto finds it instead")
    devs = detect("auto")
    assert [(d.device_id, d.device, d.kind) for d in devs] == [(0, "cpu", "cpu")]
    mem = devs[0].memory(0)
    assert 0 < mem["free_bytes"] <= mem["budget_bytes"] < mem["total_bytes"]


def test_cpu_memory_shows_what_the_rest_of_the_machine_uses():
    cpu = detect("cpu")[0]
    mem = cpu.memory(0)
    assert mem["other_bytes"] > 0  # this test process alone holds some RAM
    assert mem["used_bytes"] == mem["other_bytes"]
    assert mem["used_bytes"] + mem["free_bytes"] <= mem["total_bytes"]
    held = mem["other_bytes"] // 2  # say the manager held half of it: that half is no longer others'
    ours = cpu.memory(held)
    assert ours["manager_bytes"] == held
    assert abs(ours["other_bytes"] - (mem["other_bytes"] - held)) < held // 2  # RAM moves meanwhile


def test_nvml_without_a_gpu_means_no_cuda_devices():
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        with pytest.raises(GpuGroupsError) as e:
            detect("cuda:0")
        assert e.value.code == "unknown_device"
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML is present here")


@pytest.mark.parametrize("spec", ["virt", "virtual:0x1GiB", "virtual:2x", "virtual:1GiB@tpu", "gpu", [], [3]])
def test_bad_specs_are_clear_errors(spec):
    with pytest.raises(GpuGroupsError) as e:
        detect(spec)
    assert e.value.code in ("invalid_request", "unknown_device") and e.value.message


def test_cpu_memory_is_what_psutil_reports(monkeypatch):
    """Host RAM comes from psutil (every OS), not from parsing /proc/meminfo by hand."""
    import psutil

    cpu = detect("cpu")[0]
    assert cpu.total_bytes == psutil.virtual_memory().total
    available = 123_456_789  # a figure no real /proc/meminfo would show right now
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=available))
    mem = cpu.memory(0)
    assert mem["free_bytes"] == available
    assert mem["other_bytes"] == cpu.total_bytes - available


@pytest.mark.parametrize("spec", [["cpu", "cpu"], ["auto", "cpu", "virtual:1GiB", "cpu"]])
def test_a_real_device_listed_twice_is_refused(spec):
    """Two ``cpu`` devices would each count all the RAM; the message says how to split one."""
    if spec[0] == "auto" and detect("auto")[0].kind != "cpu":
        pytest.skip("auto is a GPU here")
    with pytest.raises(GpuGroupsError) as e:
        detect(spec)
    assert e.value.code == "invalid_request"
    assert "'cpu' listed more than once" in e.value.message and "virtual:2x4GiB@cpu" in e.value.message
    assert [d.device for d in detect(["cpu", "virtual:2x1GiB@cpu"])] == ["cpu", "virtual:1", "virtual:2"]
