"""What the REST bridge costs: ``process`` over ``/api/v2`` against the same call inside the kernel.

Starts a real ``jupyter server`` with the extension, makes a kernel the host (``gg.serve(m)``),
then alternates rounds of ``gg.Client.process`` over loopback HTTP with rounds of ``m.process``
timed inside the host kernel, and prints p50/p99 of both and of their difference. Also prints
what the extension adds to the server's start (median of alternating starts with it on and off).

    .venv/bin/python bench/bench_rest.py                 # the shipped demo model
    .venv/bin/python bench/bench_rest.py --tiny          # tiny test models built on the fly
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gpugroups as gg  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``jupyter server`` subprocess with the extension (no host yet), in its own temp dirs."""

    def __init__(
        self, tmp: Path, launcher: list[str] | None = None, env: dict[str, str] | None = None, *options: str
    ) -> None:
        """``launcher`` replaces ``python -m jupyter_server`` (same arguments); ``env`` adds variables;
        ``options`` are more command-line settings."""
        self.token, self.port = "bench", free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime = tmp / "runtime"
        (tmp / "root").mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "JUPYTER_RUNTIME_DIR": str(self.runtime),
            "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [
                *(launcher or [sys.executable, "-m", "jupyter_server"]), "--allow-root", "--no-browser", "--ip=127.0.0.1",
                f"--port={self.port}", "--port-retries=0", f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={tmp / 'root'}", "--ServerApp.jpserver_extensions={'gpugroups': True}",
                "--GpuGroupsHost.host_kernel=none", *options,
            ],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        while True:
            try:
                if requests.get(f"{self.url}/api/status", headers=self.headers, timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.01)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


#: A child that initializes a ServerApp (imports, extensions, handlers, port) and exits.
_INIT_SERVER = """
import sys
from jupyter_server.serverapp import ServerApp
ServerApp().initialize(argv=sys.argv[1:])
"""


def start_overhead(runs: int) -> dict[bool, tuple[float, float]]:
    """Median (wall, CPU) seconds of a server's initialization without and with the extension,
    alternating. CPU time (user + sys of the child) hardly feels other processes on the machine."""
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(2 * runs):
        extension = bool(i % 2)
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "JUPYTER_RUNTIME_DIR": tmp, "JUPYTER_CONFIG_DIR": tmp}
            argv = [
                f"--port={free_port()}", "--port-retries=0", "--allow-root", "--no-browser",
                f"--ServerApp.root_dir={tmp}",
                f"--ServerApp.jpserver_extensions={{'gpugroups': {extension}}}",
            ]  # fmt: skip
            t0 = time.perf_counter()
            child = subprocess.Popen(
                [sys.executable, "-c", _INIT_SERVER, *argv], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode:
                raise RuntimeError("a server failed to initialize")
            times[extension].append((time.perf_counter() - t0, usage.ru_utime + usage.ru_stime))
    return {
        ext: (statistics.median(w for w, _ in runs_), statistics.median(c for _, c in runs_))
        for ext, runs_ in times.items()
    }


_IMPORT_EXTENSION = """
import time
import jupyter_server.serverapp, jupyter_server.extension.application
t = time.perf_counter()
import gpugroups.server.app
print(time.perf_counter() - t)
"""


def import_seconds(runs: int) -> float:
    """Median seconds to import the extension in a fresh interpreter that has jupyter_server already."""
    return statistics.median(
        float(
            subprocess.run(
                [sys.executable, "-c", _IMPORT_EXTENSION], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(runs)
    )


def tiny_catalog(folder: Path) -> Path:
    from tests import tinymodels as t

    tok = t.build_tokenizer(folder / "tokenizer")
    base = t.build_causal_lm(folder / "tiny-llama", "llama", tokenizer_dir=tok)
    adapters = {m: t.build_lora_adapter(folder / m, base, seed=s) for m, s in (("tiny-a", 1), ("tiny-b", 2))}
    gpt2 = t.build_causal_lm(folder / "tiny-gpt2", "gpt2", tokenizer_dir=tok, seed=3)
    return t.catalog_toml(folder / "gpugroups.toml", base, adapters, {"tiny-gpt2": gpt2})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="build tiny test models instead of the shipped demo"
    )
    parser.add_argument(
        "--model", default=None, help="model id (default: pycode-tests, or tiny-a with --tiny)"
    )
    parser.add_argument("--prompt", default="def test_")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch.set_num_threads in the host kernel (default: torch's own); on a small CPU box its "
        "spinning intra-op threads compete with the kernel's messaging threads",
    )
    parser.add_argument(
        "--comm", action="store_true", help="requests on the bridge comm, not its direct line (to compare)"
    )
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--start-runs", type=int, default=5, help="server starts with and without the extension"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        catalog = tiny_catalog(tmp / "models") if args.tiny else None
        model = args.model or ("tiny-a" if args.tiny else "pycode-tests")
        server = Server(tmp / "server", None, None, *(["--GpuGroupsHost.direct_line=False"] if args.comm else []))
        try:
            measure(server, catalog, model, args.prompt, args.calls, args.rounds, args.torch_threads)
        finally:
            server.stop()
    if args.start_runs:
        imported = import_seconds(args.start_runs) * 1000
        print(f"importing the extension after jupyter_server: {imported:.0f} ms (median)")
        medians = start_overhead(args.start_runs)
        print(f"server initialization, median of {args.start_runs} alternating runs:")
        for name, k in (("wall", 0), ("CPU", 1)):
            off, on = medians[False][k] * 1000, medians[True][k] * 1000
            print(
                f"  {name:<4} without the extension {off:6.0f} ms, with it {on:6.0f} ms: {on - off:+5.0f} ms"
            )


class HostKernel:
    """A kernel of ``server`` that runs cells like a notebook, made the host of a manager ``m``
    with ``model`` loaded (after ``setup``, e.g. imports that patch for timing)."""

    def __init__(
        self, server: Server, catalog: Path | None, model: str, torch_threads: int, setup: str = ""
    ) -> None:
        from jupyter_client import BlockingKernelClient

        kernel_id = requests.post(
            f"{server.url}/api/kernels", headers=server.headers, json={}, timeout=60
        ).json()["id"]
        self.kc = BlockingKernelClient(connection_file=str(server.runtime / f"kernel-{kernel_id}.json"))
        self.kc.load_connection_file()
        # No heartbeat: a client made from a connection file calls a kernel "dead" when its first
        # heartbeat goes unanswered for a second, which a kernel still starting on a loaded machine is
        self.kc.start_channels(hb=False)
        self.kc.wait_for_ready(timeout=60)
        make = f"gg.Manager(catalog={str(catalog)!r})" if catalog else "gg.manager()"
        threads = f"import torch; torch.set_num_threads({torch_threads})\n" if torch_threads else ""
        self.run(f"{setup}\n{threads}import time, gpugroups as gg\nm = {make}\ngg.serve(m)\nm.load({model!r})")

    def run(self, code: str, expr: str = "None") -> Any:
        """Run ``code`` as a cell and return the JSON value of ``expr`` after it."""
        reply = self.kc.execute_interactive(
            code,
            user_expressions={"out": f"__import__('json').dumps({expr})"},
            timeout=600,
            output_hook=lambda msg: None,
        )
        content = reply["content"]
        if content["status"] != "ok":
            raise RuntimeError(f"{content['ename']}: {content['evalue']}")
        return json.loads(content["user_expressions"]["out"]["data"]["text/plain"].strip("'"))

    def close(self) -> None:
        self.kc.stop_channels()


def run(quick: bool = False) -> dict[str, float]:
    """The REST figures on the tiny test models, for ``python -m bench``."""
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        server = Server(tmp / "server")
        try:
            return measure(server, tiny_catalog(tmp / "models"), "tiny-a", "def test_", 100 if quick else 300, 3, 1)
        finally:
            server.stop()


def measure(
    server: Server, catalog: Path | None, model: str, prompt: str, n: int, rounds: int, torch_threads: int
) -> dict[str, float]:
    """Alternating rounds of ``n`` REST and in-kernel calls; prints the comparison, returns the figures."""
    host = HostKernel(server, catalog, model, torch_threads)
    in_kernel = host.run
    client = gg.Client(server.url, server.token)
    timed = timed_loop(f"m.process({model!r}, {prompt!r})", n)
    for _ in range(20):  # warm both paths: first calls pay for lazy setup
        client.process(model, prompt)
    in_kernel(timed)

    rest: list[float] = []
    kernel: list[float] = []
    paced: list[float] = []
    for _ in range(rounds):
        rest += timed_calls(lambda: client.process(model, prompt), n)
        kernel += in_kernel(timed, "lat")  # type: ignore[operator]
        # The same calls spaced like REST calls are: an idle gap before each slows the forward
        # pass by itself (torch's worker threads go to sleep), REST or not.
        gap = max(0.0, pct(rest, 50) - pct(kernel, 50))
        paced += in_kernel(timed_loop(f"m.process({model!r}, {prompt!r})", n, gap), "lat")  # type: ignore[operator]
    state_kernel: list[float] = in_kernel(timed_loop("m.state()", n), "lat")  # type: ignore[assignment]
    state_rest = timed_calls(client.state, n)
    # Jupyter's own status route through the same connection pool: HTTP, auth and tornado, no kernel
    status = timed_calls(lambda: client._http.request("GET", f"{server.url}/api/status", headers=server.headers), n)
    host.close()

    print(f"process({model!r}, {prompt!r}) on {len(rest)} calls per path, {rounds} alternating rounds")
    compare("m.process in the kernel", kernel, "gg.Client.process (REST)", rest)
    print(f"the same, against in-kernel calls each after an idle gap as long as REST's ({gap * 1000:.1f} ms)")
    compare("m.process, paced like REST", paced, "gg.Client.process (REST)", rest)
    print(f"state() on {n} calls per path")
    compare("m.state in the kernel", state_kernel, "gg.Client.state (REST)", state_rest)
    print(row("of which HTTP + auth", pct(status, 50), pct(status, 99)) + "   (GET /api/status, no kernel)")
    return {
        "rest_overhead_ms_p50": (pct(rest, 50) - pct(kernel, 50)) * 1e3,
        "rest_overhead_ms_p99": (pct(rest, 99) - pct(kernel, 99)) * 1e3,
        "rest_state_ms_p50": pct(state_rest, 50) * 1e3,
        "rest_http_ms_p50": pct(status, 50) * 1e3,
    }


def timed_calls(call: Any, n: int) -> list[float]:
    """Seconds each of ``n`` calls of ``call()`` took."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def timed_loop(call: str, n: int, gap: float = 0.0) -> str:
    """Kernel code that times ``call`` ``n`` times into the list ``lat`` (seconds), sleeping
    ``gap`` seconds (untimed) before each."""
    pause = f"    time.sleep({gap!r})\n" if gap else ""
    body = f"{pause}    t = time.perf_counter()\n    {call}\n    lat.append(time.perf_counter() - t)"
    return f"lat = []\nfor _ in range({n}):\n{body}"


def row(name: str, p50: float, p99: float, fmt: str = "7.2f") -> str:
    return f"  {name:<28} p50 {p50 * 1000:{fmt}} ms   p99 {p99 * 1000:{fmt}} ms"


def compare(base_label: str, base: list[float], label: str, values: list[float]) -> None:
    """Print p50/p99 of both and of their difference, in ms."""
    print(row(base_label, pct(base, 50), pct(base, 99)))
    print(row(label, pct(values, 50), pct(values, 99)))
    extra = row("REST overhead", pct(values, 50) - pct(base, 50), pct(values, 99) - pct(base, 99), "+7.2f")
    print(f"{extra}   (p50 ratio {pct(values, 50) / pct(base, 50):.2f}x)")


if __name__ == "__main__":
    main()
