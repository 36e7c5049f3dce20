"""A server process a device starts for one run (``server: null`` in a recipe).

It listens on loopback only, takes its token from an environment variable (never from the command
line, where ``ps`` shows it), runs in its own process group (Ctrl-C reaches only the device, which then
stops it cleanly) and exits by itself when the device process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from lightning_mobillm.server.app import READY_PREFIX, ROLES
from lightning_mobillm.server.runtime import ServerConfig
from lightning_mobillm.transport.link import LinkError

log = logging.getLogger("lightning_mobillm.server")

__all__ = ["EmbeddedServer", "server_log_path"]


def server_log_path(trainer) -> Path | None:
    """``server.log`` in the run's log folder; None (the server inherits stderr) without a logger."""
    if trainer is None or not trainer.loggers:
        return None
    try:
        _ = trainer.loggers[0].experiment  # let the logger create its folder before we write into it
        folder = Path(trainer.log_dir)
    except Exception:  # noqa: BLE001 - a logger without a local folder
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "server.log"


class EmbeddedServer:
    """Start (:meth:`start`) and stop (:meth:`stop`) a loopback server process.

    Args:
        config: the server's settings (host, port and token are overridden: loopback, a free port,
            ``token`` through ``config.token_env``).
        token: the secret the device will present.
        role: which server runs (``side`` for MobiLLM/PAE, ``split`` for the split-learning baseline).
        log_path: file that receives the server's log (None: the device's stderr).
    """

    def __init__(self, config: ServerConfig, token: str, *, role: str = "side", log_path: Path | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        self.config = config
        self.token = token
        self.role = role
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    def start(self, timeout: float = 120.0) -> str:
        """Spawn the process and wait for its READY line; returns ``"127.0.0.1:<port>"``."""
        cfg = asdict(self.config)
        cfg.update(host="127.0.0.1", port=0, token=None)
        env = dict(os.environ)
        env[self.config.token_env] = self.token
        stderr = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - handed to the child
        cmd = [sys.executable, "-m", "lightning_mobillm.server", "--role", self.role,
               "--config-json", json.dumps(cfg), "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, start_new_session=True)
        if stderr is not None:
            stderr.close()
        fields = dict(kv.split("=", 1) for kv in self._ready_line(timeout).split()[1:])
        self.pid = int(fields["pid"])
        log.info("embedded %s server pid %s on 127.0.0.1:%s (log: %s)", self.role, self.pid, fields["port"],
                 self.log_path)
        return f"127.0.0.1:{fields['port']}"

    def _ready_line(self, timeout: float) -> str:
        assert self.proc is not None
        result: list[str] = []

        def reader() -> None:
            for raw in self.proc.stdout:
                text = raw.decode(errors="replace").strip()
                if text.startswith(READY_PREFIX):
                    result.append(text)
                    return

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        thread.join(timeout)
        if not result:
            code = self.proc.poll()
            self.proc.kill()
            raise LinkError(
                f"embedded server did not start within {timeout:.0f} s"
                + (f" (exit code {code}; see {self.log_path})" if code is not None else "")
            )
        return result[0]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; idempotent."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
