"""The extension app builds the host policy with the server's config: ``GpuGroupsHost.<setting>``,
and the pre-0.2 ``GpuGroupsApp.<setting>`` still honoured (with a warning) where not overridden."""

from __future__ import annotations

from typing import Any

import pytest

from gpugroups.server.host import GpuGroupsHost

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"gpugroups": True}},
        "GpuGroupsHost": {"host_kernel": "none", "request_timeout": 7.0},
        "GpuGroupsApp": {"request_timeout": 99.0, "kernel_name": "legacy-spec"},
    }


def test_the_host_takes_its_settings_from_its_own_section_and_the_old_one(jp_serverapp: Any) -> None:
    host = jp_serverapp.web_app.settings["gpugroups_host"]
    assert isinstance(host, GpuGroupsHost)
    assert host.kernel_manager is jp_serverapp.kernel_manager
    assert host.host_kernel == "none"
    assert host.request_timeout == 7.0  # its own section wins over the old name
    assert host.kernel_name == "legacy-spec"  # the old name still reaches it
    assert host.use_subshells is True and host.model_roots == []  # untouched settings keep their defaults


def test_each_setting_is_declared_once_on_the_host() -> None:
    from gpugroups.server.app import GpuGroupsApp

    settings = set(GpuGroupsHost.class_trait_names(config=True))
    assert settings == {
        "host_kernel", "kernel_name", "request_timeout", "host_start_timeout",
        "model_roots", "trust_remote_code", "use_subshells", "direct_line", "max_body_bytes", "ws_send_timeout",
        "devices", "ray_address", "ray_namespace",
    }  # fmt: skip
    assert settings.isdisjoint(GpuGroupsApp.class_trait_names(config=True))
    assert GpuGroupsHost in GpuGroupsApp.classes  # --help-all lists them


def test_the_old_names_are_reported_as_deprecated(jp_configurable_serverapp: Any, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    jp_configurable_serverapp()  # the app logs to stderr, not through pytest's logging capture
    warned = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert len(warned) == 1, warned
    assert warned[0].endswith("instead of the deprecated GpuGroupsApp.kernel_name, GpuGroupsApp.request_timeout")


def test_a_refused_setting_leaves_a_server_that_starts_and_stops(tmp_path: Any, tiny_catalog_toml: Any) -> None:
    """A bad ``GpuGroupsHost`` value is a configuration error in the log; the server still serves
    its own API and stops on SIGTERM (the extension's start and stop do not fail on the host it
    could not build)."""
    import signal
    import subprocess

    from .conftest import LiveServer

    server = LiveServer(tmp_path, tiny_catalog_toml, ["--GpuGroupsHost.host_kernel=bogus"])
    try:
        assert server.get("/api/status").ok
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not stop on SIGTERM")
        log = server.log_path.read_text()
        assert "host_kernel" in log and "bogus" in log
        assert "AttributeError" not in log
    finally:
        server.stop()
