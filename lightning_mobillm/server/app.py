"""Run a side-network server until it is told to stop (signal, or the parent device process exits).

Before it listens, :func:`serve` settles who may call and over what: the credentials
(:class:`~lightning_mobillm.transport.security.Credentials`: a per-device tokens file, one shared token, or
none) and TLS (:class:`~lightning_mobillm.transport.security.TlsServerConfig`). A server on a non-loopback
address without TLS or without a token refuses to start unless ``allow_insecure`` (:func:`check_exposure`).
Its log lines are truncated and rate-limited (:mod:`lightning_mobillm.server.logs`), since devices can
provoke them.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import signal
import threading

import torch

from lightning_mobillm.protocol import READY_PREFIX
from lightning_mobillm.server.logs import install_log_limits
from lightning_mobillm.server.memory import limit_arenas
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.link import FRAME_SLACK_BYTES, serve_link
from lightning_mobillm.transport.security import Credentials, TlsServerConfig

log = logging.getLogger("lightning_mobillm.server")

#: What a server process can be: the MobiLLM/PAE side-network server, the split-learning baseline's
#: server (which, unlike the side server, holds the upper blocks of a backbone), or Fed MobiLLM's
#: shared-model server (one side network for a federation of devices, trained in a thread of its own).
ROLES: dict[str, str] = {
    "side": "lightning_mobillm.server.runtime:SideServer",
    "split": "lightning_mobillm.server.split:SplitServer",
    "fed": "lightning_mobillm.server.fed:FedServer",
}


def make_handler(role: str, config: ServerConfig):
    """Instantiate the server object of ``role`` (it has ``handle(data, identity) -> bytes`` and ``device``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    module, _, cls = ROLES[role].partition(":")
    return getattr(importlib.import_module(module), cls)(config)


class ServerSetupError(ValueError):
    """The server's settings do not allow it to start (reported without a traceback by ``serve``)."""


class InsecureServerError(ServerSetupError):
    """A server would be reachable from other machines without TLS or without a token."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def check_exposure(host: str, credentials_mode: str, tls: bool, allow_insecure: bool) -> str | None:
    """Refuse to serve a non-loopback ``host`` without TLS or without a token, unless ``allow_insecure``.

    Returns:
        None when the setup is safe, else what is missing (the caller logs it as a warning).

    Raises:
        InsecureServerError: naming what is missing and ``allow_insecure``.
    """
    if is_loopback(host):
        return None
    missing = [what for what, bad in (("TLS", not tls), ("a token", credentials_mode == "open")) if bad]
    if not missing:
        return None
    problem = (f"serving on {host} without {' and without '.join(missing)}: "
               + ("anyone on the network can train on this server" if credentials_mode == "open" else
                  "tokens, session secrets, activations and weights cross the network in clear text"))
    if not allow_insecure:
        raise InsecureServerError(
            f"{problem}. Set server.tls_cert_file/tls_key_file and server.tokens_file (or a shared token in "
            "server.token_env / server.token_file), or set server.allow_insecure: true to serve anyway."
        )
    return problem


def serve(config: ServerConfig, *, parent_pid: int | None = None, role: str = "side") -> None:
    """Serve until SIGTERM/SIGINT, or until ``parent_pid`` is no longer this process's parent.

    Prints one line ``MOBILLM_SERVER_READY port=<port> pid=<pid>`` on stdout once it accepts calls.

    Raises:
        ServerSetupError: before anything is bound or loaded, if the credentials or TLS files are missing or
            malformed, or the server would be exposed without TLS or a token (:func:`check_exposure`).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[server %(process)d] %(levelname)s %(message)s")
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.release_memory:
        limit_arenas(2)
    install_log_limits()
    try:
        credentials = Credentials.from_config(config)
        tls = TlsServerConfig.from_config(config)
        if tls is not None:
            tls.credentials()  # read the files now: a missing or bad one is named before anything starts
        shared_ignored = credentials.mode == "tokens_file" and config.resolved_token() is not None
    except (OSError, ValueError) as err:
        raise ServerSetupError(str(err)) from err
    problem = check_exposure(config.host, credentials.mode, tls is not None, config.allow_insecure)
    if problem:
        log.warning("%s (allow_insecure: true)", problem)
    if shared_ignored:
        log.warning("tokens_file is set: the shared token (%s / token_file) is ignored", config.token_env)
    log.info("who may call: %s; TLS: %s", credentials.describe(),
             ("mutual (client certificates required)" if tls.mutual else "on") if tls else "off")
    side = make_handler(role, config)
    grpc_server, port = serve_link(
        side.handle,
        host=config.host,
        port=config.port,
        credentials=credentials,
        tls=tls,
        max_message_bytes=config.max_frame_bytes + FRAME_SLACK_BYTES,
        max_reply_bytes=config.max_reply_bytes + FRAME_SLACK_BYTES,
        max_workers=config.max_workers,
        max_concurrent_rpcs=config.max_concurrent_rpcs,
        max_calls_per_identity=config.max_calls_per_identity,
        keepalive_s=config.keepalive_s,
        max_connection_idle_s=config.max_connection_idle_s,
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
    close = getattr(side, "close", None)  # a role with a thread of its own (fed) stops it and checkpoints
    if callable(close):
        close()
    log.info("stopped (%d sessions open, %d frames refused)", len(side.sessions), side.frames_refused)
