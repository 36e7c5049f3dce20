"""Run a side-network server until it is told to stop (signal, or the parent device process exits)."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading

import torch

from lightning_mobillm.protocol import READY_PREFIX
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.link import serve_link

log = logging.getLogger("lightning_mobillm.server")

#: What a server process can be: the MobiLLM/PAE side-network server, or the split-learning baseline's
#: server (which, unlike the side server, holds the upper blocks of a backbone).
ROLES: dict[str, str] = {
    "side": "lightning_mobillm.server.runtime:SideServer",
    "split": "lightning_mobillm.server.split:SplitServer",
}


def make_handler(role: str, config: ServerConfig):
    """Instantiate the server object of ``role`` (it has ``handle(bytes) -> bytes`` and ``device``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    module, _, cls = ROLES[role].partition(":")
    return getattr(importlib.import_module(module), cls)(config)


def serve(config: ServerConfig, *, parent_pid: int | None = None, role: str = "side") -> None:
    """Serve until SIGTERM/SIGINT, or until ``parent_pid`` is no longer this process's parent.

    Prints one line ``MOBILLM_SERVER_READY port=<port> pid=<pid>`` on stdout once it accepts calls.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[server %(process)d] %(levelname)s %(message)s")
    if config.threads:
        torch.set_num_threads(config.threads)
    token = config.resolved_token()
    if token is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: any device that reaches this address can train", config.host)
    side = make_handler(role, config)
    grpc_server, port = serve_link(
        side.handle,
        host=config.host,
        port=config.port,
        token=token,
        max_message_bytes=config.max_frame_mb * 2**20 + 2**20,
        max_workers=config.max_workers,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{READY_PREFIX} port={port} pid={os.getpid()}", flush=True)
    log.info("%s server listening on %s:%d (training on %s)", role, config.host, port, side.device)
    while not stop.wait(0.5):
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("device process %d is gone; shutting down", parent_pid)
            break
    grpc_server.stop(grace=2.0).wait()
    log.info("stopped (%d sessions open, %d frames refused)", len(side.sessions), side.frames_refused)
