"""``ServerClient``: the device's one connection to a server, owned by a strategy (or a module).

It starts or reaches the server, says hello, sends requests (synchronously, or through the ordered
in-flight queue that lets the device forward the next batch while the server trains), pushes and pulls
the server's state, and says goodbye. The MobiLLM/PAE strategy and the split-learning baseline both use
it, and close it in their ``teardown``, as ``lightning_hivemind``'s strategy owns its DHT.

Where the server is:

* ``address=None``: an **embedded** server, a separate process on loopback started for this run with
  ``python -m lightning_mobillm serve`` (:class:`EmbeddedServer`): the device process never imports the
  server runtime.
* ``address="host:port"``: a running server (``python -m lightning_mobillm serve`` on another machine),
  over gRPC.
* ``address="inprocess"``: the server's handler in this process behind an
  :class:`~lightning_mobillm.transport.link.InProcessLink` (frames still encoded, validated and counted).
  For unit tests and many-device simulation; this is the one case that loads the server runtime here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from lightning_mobillm import protocol as P
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.frames import Frame, FrameSchema, decode_frame, encode_frame
from lightning_mobillm.transport.link import (
    FRAME_SLACK_BYTES,
    GrpcLink,
    InProcessLink,
    Link,
    LinkError,
    LinkStats,
)

log = logging.getLogger(__name__)

__all__ = ["INPROCESS", "EmbeddedServer", "ServerClient", "ServerError", "server_log_path", "start_serve", "stop_process"]

#: the address that selects the in-process link
INPROCESS = "inprocess"
#: the server roles a process can run (``serve --role``)
ROLES = ("side", "split", "fed")


class ServerError(RuntimeError):
    """The server refused a frame or failed to handle it."""


def read_token(token_env: str, token_file: str | None = None) -> str | None:
    """A device's token: the contents of ``token_file`` if given, else the ``token_env`` variable, else None.
    Tokens are never taken from a config key or the command line."""
    if token_file:
        token = Path(token_file).expanduser().read_text().strip()
        if not token:
            raise ValueError(f"token_file {token_file} is empty")
        return token
    return os.environ.get(token_env) or None


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
    """Start (:meth:`start`) and stop (:meth:`stop`) a loopback server process for one run.

    The process is ``python -m lightning_mobillm serve --role <role>``, the same entry a standalone server
    uses. It listens on loopback only, takes its token from an environment variable (never from the
    command line, where ``ps`` shows it), runs in its own process group (Ctrl-C reaches only the device,
    which then stops it cleanly) and exits by itself when the device process is gone.

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
        cfg = dataclasses.asdict(self.config)
        cfg.update(host="127.0.0.1", port=0, tokens_file=None, token_file=None)
        env = dict(os.environ)
        env[self.config.token_env] = self.token
        settings = {"role": self.role, "parent_pid": os.getpid(), "server": cfg}
        self.proc, fields = start_serve(["--config", json.dumps(settings)], log_path=self.log_path, env=env,
                                        timeout=timeout, new_session=True)
        self.pid = int(fields["pid"])
        log.info("embedded %s server pid %s on 127.0.0.1:%s (log: %s)", self.role, self.pid, fields["port"],
                 self.log_path)
        return f"127.0.0.1:{fields['port']}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; idempotent. Returns once the process is reaped."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)


def start_serve(args: list[str], *, log_path: Path | None = None, env: dict[str, str] | None = None,
                cwd: Path | str | None = None, timeout: float = 120.0,
                new_session: bool = False) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start ``python -m lightning_mobillm serve <args>`` and wait (at most ``timeout`` s) for its READY line.

    The server's log goes to ``log_path`` (appended; None: this process's stderr), never to a pipe nobody
    reads; its stdout is read on a thread to the end, so whatever it prints after READY (a fault point's
    marker) never fills the pipe. ``new_session`` puts it in its own process group (Ctrl-C then reaches only
    the caller). Returns the process and the READY line's fields (``port``, ``pid``); raises
    :class:`LinkError` (and leaves no process) when it does not start.
    """
    stderr = open(log_path, "ab") if log_path else None  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "lightning_mobillm", "serve", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                            start_new_session=new_session)
    if stderr is not None:
        stderr.close()
    result: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        try:
            for raw in proc.stdout:
                text = raw.decode(errors="replace").strip()
                if not ready.is_set() and text.startswith(P.READY_PREFIX):
                    result.append(text)
                    ready.set()
                elif text:
                    log.debug("server: %s", text)
        except (OSError, ValueError):  # the pipe was closed by stop_process
            pass
        ready.set()

    threading.Thread(target=reader, daemon=True, name="mobillm-serve-stdout").start()
    ready.wait(timeout)
    if not result:
        code = proc.poll()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise LinkError(f"the server did not start within {timeout:.0f} s"
                        + (f" (exit code {code}; see {log_path})" if code is not None else ""))
    return proc, dict(kv.split("=", 1) for kv in result[0].split()[1:])


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code once the process is reaped
    (also when interrupted while waiting: it is never left running)."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("pid %s did not stop within %.0f s of SIGTERM; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def _in_process_handler(role: str, config: ServerConfig):
    """The server object of ``role`` in this process (the in-process link's far end)."""
    app = importlib.import_module("lightning_mobillm.server.app")  # only here: the device never loads it
    return app.make_handler(role, config)


class ServerClient:
    """The device's connection to one server (see the module docstring).

    Args:
        address: ``host:port``, ``"inprocess"``, or None for an embedded server process.
        token: the device token (an embedded server is given it through ``embedded.token_env``).
        role: the server role to start or expect (``side`` or ``split``).
        embedded: settings of an embedded or in-process server.
        log_path: where an embedded server writes its log.
        connect_timeout, call_timeout, retries: link settings.
        reply_schemas: what replies of this role may carry.
        tls: TLS settings of a remote server's link (``ca_file``, ``cert_file``, ``key_file``,
            ``server_name``; unset ones may be None); None or all None: plaintext (loopback servers).
    """

    def __init__(
        self,
        address: str | None,
        token: str | None,
        *,
        role: str = "side",
        embedded: ServerConfig | None = None,
        log_path: Path | None = None,
        connect_timeout: float = 60.0,
        call_timeout: float = 600.0,
        retries: int = 3,
        reply_schemas: dict[str, FrameSchema] | None = None,
        tls: dict[str, str | None] | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        self.address = address
        self.token = token
        self.role = role
        self.embedded = embedded or ServerConfig()
        self.log_path = log_path
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.retries = retries
        self.reply_schemas = reply_schemas or {"split": P.SPLIT_REPLY_SCHEMAS, "fed": P.FED_REPLY_SCHEMAS}.get(
            role, P.REPLY_SCHEMAS)
        self.tls = {k: v for k, v in (tls or {}).items() if v is not None}
        self.link: Link | None = None
        self.session: str | None = None
        self.secret: str | None = None  # the session's secret, from the hello's reply; never logged
        self.server_pid: int | None = None
        self.in_process_server: Any = None  # the server object behind an in-process link (for tests)
        self._embedded: EmbeddedServer | None = None
        self._pending: deque[tuple[Any, Future]] = deque()

    # ---- connection -------------------------------------------------------------------------------
    @property
    def stats(self) -> LinkStats:
        return self.link.stats if self.link is not None else LinkStats()

    def open(self) -> ServerClient:
        """Start or reach the server (idempotent)."""
        if self.link is not None:
            return self
        if self.address == INPROCESS:
            self.in_process_server = _in_process_handler(self.role, self.embedded)
            self.link = InProcessLink(self.in_process_server.handle,
                                      max_message_bytes=self.embedded.max_frame_bytes + FRAME_SLACK_BYTES,
                                      max_reply_bytes=self.embedded.max_reply_bytes + FRAME_SLACK_BYTES)
            return self
        address = self.address
        try:  # an interrupt (Ctrl-C) while the server starts must not leave it running
            if address is None:
                self._embedded = EmbeddedServer(self.embedded, self.token, role=self.role, log_path=self.log_path)
                address = self._embedded.start(timeout=self.connect_timeout)
            kwargs: dict[str, Any] = {}
            if self.tls and address == self.address:  # an embedded server is on loopback: no TLS
                from lightning_mobillm.transport.security import TlsClientConfig

                kwargs["tls"] = TlsClientConfig(**self.tls)
            self.link = GrpcLink(address, self.token, connect_timeout=self.connect_timeout,
                                 call_timeout=self.call_timeout, retries=self.retries,
                                 max_reply_bytes=self.embedded.max_reply_bytes + FRAME_SLACK_BYTES, **kwargs)
        except BaseException:
            self._stop_embedded()
            raise
        return self

    def close(self, *, drain_timeout: float = 5.0, bye_timeout: float = 2.0) -> None:
        """Bounded in time: wait up to ``drain_timeout`` s for frames in flight (their replies are dropped),
        say goodbye with a deadline of ``bye_timeout`` s and no retry, close the link (which ends a call
        still in flight), and stop an embedded server (SIGTERM, then SIGKILL)."""
        deadline = time.monotonic() + drain_timeout
        try:
            while self._pending:
                _, future = self._pending.popleft()
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - closing after a failure (or past the deadline) must still stop
            log.debug("frames in flight failed or were abandoned while closing", exc_info=True)
        self._abandon_pending()
        try:
            if self.link is not None:
                if self.session is not None:
                    self.link.limit_calls(bye_timeout)
                    try:
                        self.link.call(encode_frame(Frame(kind=P.BYE, header=self.session_header())))
                    except Exception:  # noqa: BLE001 - a closed or unreachable server needs no goodbye
                        log.debug("no goodbye: the server did not answer", exc_info=True)
                self.link.close()
        finally:
            self.link = None
            self.session = self.secret = None
            self._stop_embedded()

    def reconnect(self, timeout: float) -> None:
        """After the server became unreachable: drop the frames in flight, close the link without a goodbye,
        and reach the server again, for up to ``timeout`` seconds: an embedded server is restarted on the
        same workdir (where its checkpoints are), a remote one is tried until it answers. The session is
        then resumed with a hello (``resume: true``); byte counts go on adding up."""
        stats = self.stats
        self._abandon_pending()
        if self.link is not None:
            self.link.close()
            self.link = None
        self.session = self.secret = None
        self._stop_embedded()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.open()
                break
            except LinkError:
                if time.monotonic() >= deadline:
                    raise
                log.info("server at %s not reachable yet; trying again", self.address or "(embedded)")
        self.link.stats = stats

    @property
    def embedded_server_alive(self) -> bool | None:
        """Whether an embedded server process is still running (None: the server is not embedded)."""
        return None if self._embedded is None else self._embedded.alive

    def _abandon_pending(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    def _stop_embedded(self) -> None:
        if self._embedded is not None:
            embedded, self._embedded = self._embedded, None
            embedded.stop()

    # ---- requests ---------------------------------------------------------------------------------
    def _require_link(self) -> Link:
        if self.link is None:
            raise RuntimeError("the client is not connected: call open() first")
        return self.link

    def decode_reply(self, data: bytes) -> Frame:
        """Parse reply bytes; an error frame becomes :class:`ServerError`."""
        frame = decode_frame(data, self.reply_schemas, require_finite=False)
        if frame.kind == P.ERROR:
            raise ServerError(f"server refused a frame: {frame.header['message']}")
        return frame

    def call(self, data: bytes) -> bytes:
        """Send encoded frame bytes and return the reply bytes (nothing decoded)."""
        return self._require_link().call(data)

    def session_header(self, **header: Any) -> dict[str, Any]:
        """The header of a frame of this session: its name and secret, then ``header``."""
        if self.session is None or self.secret is None:
            raise RuntimeError("no session: say hello first")
        return {"session": self.session, "secret": self.secret, **header}

    def request(self, frame: Frame) -> Frame:
        """Send a frame (the session and its secret are filled in) and wait for its decoded reply."""
        if frame.kind not in (P.HELLO, P.SPLIT_HELLO):
            frame.header = {**self.session_header(), **frame.header}
        return self.decode_reply(self.call(encode_frame(frame)))

    def hello(self, kind: str, header: dict[str, Any]) -> Frame:
        """Open (or reconnect to) a session: the hello carries the protocol version; the reply names the
        session and its secret."""
        reply = self.request(Frame(kind=kind, header={"protocol": P.PROTOCOL_VERSION, **header}))
        self.session = reply.header["session"]
        self.secret = reply.header["secret"]
        self.server_pid = int(reply.header["server_pid"])
        return reply

    # ---- the in-flight queue ----------------------------------------------------------------------
    def submit(self, data: bytes, tag: Any = None) -> None:
        """Queue encoded frame bytes; replies come back in order through :meth:`complete_oldest`."""
        self._pending.append((tag, self._require_link().submit(data)))

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def oldest_done(self) -> bool:
        return bool(self._pending) and self._pending[0][1].done()

    def complete_oldest(self) -> tuple[Any, bytes]:
        """Wait for the oldest frame in flight; returns its tag and reply bytes (not yet decoded)."""
        tag, future = self._pending.popleft()
        return tag, future.result()

    def drain(self) -> None:
        """Wait for every frame in flight, discarding the replies (the owner completes the ones it needs
        with :meth:`complete_oldest` first)."""
        while self._pending:
            self.complete_oldest()

    # ---- state --------------------------------------------------------------------------------------
    def push_state(self, state: dict) -> Frame:
        """Replace the session's state (model, and optionally optimizer, scheduler, step) on the server."""
        skeleton, blob = P.pack_state(state)
        return self.request(Frame(kind=P.SET_STATE, header={"skeleton": skeleton}, tensors={"state": blob}))

    def pull_state(self, model_only: bool = False) -> dict:
        """Download the session's model, optimizer, scheduler and step (call :meth:`drain` first); with
        ``model_only``, the model and step alone (a third of the bytes with AdamW)."""
        reply = self.request(Frame(kind=P.GET_STATE, header={"model_only": True} if model_only else {}))
        return P.unpack_state(reply.header["skeleton"], reply.tensors["state"])
