"""Start, watch and stop Flower's processes by PID (no ``flwr`` import; the executables come with the extra).

:class:`FlowerProcesses` is what ``tests/test_flower.py`` and ``benchmarks/flower_run.py`` use to own every
Flower process they start: a SuperLink on free ports (simulation mode, or deployment mode with TLS and SuperNode
authentication), SuperNodes, ``flwr run``; a ``FLWR_HOME`` of its own whose ``config.toml`` names the SuperLink
connection ``own``; the offline variables of ``apps/flower/offline.env``; every process's descendants (the
SuperExec, the ServerApp and ClientApp processes, Ray's daemons) recorded while they live and killed at the end;
and the summed RSS of all of them sampled in a thread (:attr:`FlowerProcesses.peak_rss_mb`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["FlowerProcesses", "offline_env"]

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "apps" / "flower"


def offline_env(app: Path = APP) -> dict[str, str]:
    """The variables of ``<app>/offline.env`` (Flower offline: telemetry, update checks, Ray's usage stats,
    runtime dependency installation)."""
    pairs = (line.split("=", 1) for line in (app / "offline.env").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


class FlowerProcesses:
    """Flower's processes for one run, owned by PID (a context manager: :meth:`stop` on exit).

    Args:
        workdir: logs, ``FLWR_HOME``, certificates and keys go here.
        env: extra environment (e.g. ``LIGHTNING_MOBILLM_CACHE``).
        bin_dir: where ``flower-superlink``, ``flower-supernode``, ``flower-superexec`` and ``flwr`` are
            (default: this interpreter's ``bin``).
    """

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, bin_dir: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin = Path(bin_dir or Path(sys.executable).parent)
        for exe in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
            if not (self.bin / exe).exists():
                raise FileNotFoundError(f"{exe} is not in {self.bin}: pip install -e '.[flower]' in this environment")
        # Ray's session folder holds AF_UNIX sockets (paths of at most 107 bytes): a short folder of its own
        self._ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.env = {**os.environ, **offline_env(), **(env or {}), "FLWR_HOME": str(self.home),
                    "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_TMPDIR": str(self._ray_tmp)}
        self.ports = {name: free_port() for name in ("runtime", "health")}
        self.procs: list[subprocess.Popen] = []
        self.owned: dict[int, Any] = {}
        self.peak_rss_mb = 0.0
        self._logs: list[Any] = []
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    # ---- processes -------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen([str(self.bin / args[0]), *args[1:]], env=self.env, cwd=self.workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_superlink(self, *, simulation: bool, tls: dict[str, Path] | None = None,
                        node_auth: bool = False, timeout_s: float = 120.0) -> subprocess.Popen:
        """A SuperLink on this run's free ports; waits (bounded) until its health endpoint answers. With
        ``tls`` (``ca``, ``cert``, ``key``) it serves TLS; ``node_auth`` enables SuperNode authentication."""
        p = self.ports
        # Flower 1.42 serves its runtime, control and fleet APIs over HTTP on one port (--port; the
        # --*-api-address flags are deprecated); the gRPC health server has an address of its own
        args = ["flower-superlink", "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(p["runtime"]),
                "--health-server-address", f"127.0.0.1:{p['health']}"]
        args += ["--simulation"] if simulation else []
        if tls:
            args += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile",
                     str(tls["key"])]
        else:
            args += ["--insecure"]
        args += ["--enable-supernode-auth"] if node_auth else []
        proc = self._start("superlink", args)
        # flwr 1.42's CLI talks to the SuperLink's runtime HTTP API (--port), as its managed local connection does
        conn = f'address = "127.0.0.1:{p["runtime"]}"\n'
        conn += f'root-certificates = "{tls["ca"]}"\n' if tls else "insecure = true\n"
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "own"\n\n[superlink.own]\n{conn}')
        self._wait_healthy(proc, tls is not None, timeout_s)
        self._start_sampling()
        return proc

    def _wait_healthy(self, proc: subprocess.Popen, tls: bool, timeout_s: float) -> None:
        """Bounded readiness: the SuperLink's runtime HTTP API answers ``/health``, or (TLS) its
        port accepts connections (with TLS, where the HTTP probe would need the CA)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the SuperLink exited with {proc.returncode}: "
                                   f"{(self.workdir / 'superlink.log').read_text()[-3000:]}")
            try:
                if tls:
                    with socket.create_connection(("127.0.0.1", self.ports["runtime"]), timeout=1.0):
                        return
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['runtime']}/health", timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the SuperLink did not become ready in {timeout_s:.0f} s")
            time.sleep(0.2)

    def start_supernode(self, name: str, node_config: str, *, tls_ca: Path | None = None,
                        auth_key: Path | None = None) -> subprocess.Popen:
        """A SuperNode dialling this run's SuperLink (TLS with ``tls_ca``; authenticated with ``auth_key``)."""
        args = ["flower-supernode", "--superlink", f"127.0.0.1:{self.ports['runtime']}", "--isolation", "subprocess",
                "--node-config", node_config, "--port", str(free_port())]
        args += ["--root-certificates", str(tls_ca)] if tls_ca else ["--insecure"]
        args += ["--auth-supernode-private-key", str(auth_key)] if auth_key else []
        return self._start(name, args)

    def flwr(self, *args: str, timeout_s: float = 900.0) -> subprocess.CompletedProcess:
        """``flwr <args>`` against this run's SuperLink (``own`` in this run's ``FLWR_HOME``)."""
        out = subprocess.run([str(self.bin / "flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                             text=True, timeout=timeout_s)
        with (self.workdir / "flwr.log").open("a") as f:
            f.write(f"$ flwr {' '.join(args)}\n{out.stdout}{out.stderr}\n")
        self._record_descendants()
        return out

    def run_app(self, run_config: dict[str, Any], federation_config: str | None = None, app: Path = APP,
                timeout_s: float = 900.0) -> subprocess.CompletedProcess:
        """``flwr run <app> own --stream`` with ``run_config`` written to a TOML file of overrides."""
        path = self.workdir / "run-config.toml"
        path.write_text("".join(f'"{k}" = {toml_value(v)}\n' for k, v in run_config.items()))
        args = ["run", str(app), "own", "--stream", "--run-config", str(path)]
        args += ["--federation-config", federation_config] if federation_config else []
        return self.flwr(*args, timeout_s=timeout_s)

    # ---- watching and stopping -------------------------------------------------------------------
    def _record_descendants(self) -> list[Any]:
        import psutil

        found = []
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for p in found:
            self.owned.setdefault(p.pid, p)
        return found

    def _start_sampling(self) -> None:
        if self._sampler is not None:
            return

        def sample() -> None:
            import psutil

            while not self._stop_sampling.wait(0.5):
                total = 0
                for p in self._record_descendants():
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        continue
                self.peak_rss_mb = max(self.peak_rss_mb, total / 2**20)

        self._sampler = threading.Thread(target=sample, name="flower-rss", daemon=True)
        self._sampler.start()

    def stop(self) -> list[int]:
        """Stop every process started here and every descendant seen; returns the PIDs still alive after
        (empty when all are gone)."""
        import psutil

        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
        self._record_descendants()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        for p in self.owned.values():
            try:
                p.kill()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(self.owned.values()), timeout=20)
        for log in self._logs:
            log.close()
        shutil.rmtree(self._ray_tmp, ignore_errors=True)
        left = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p.pid)
            except psutil.Error:
                continue
        return left

    def __enter__(self) -> FlowerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
