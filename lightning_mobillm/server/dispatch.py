"""Dispatch: from request bytes to reply bytes, apart from what training does with a frame.

:class:`FrameServer` decodes and validates every frame against its role's schemas, refuses what does not
fit with an error frame (the server keeps running and the refused frame changes nothing), counts bytes,
and keeps the table of open sessions. It is also where authority lives:

* **Identity.** The transport authenticates a call and names its identity (a per-device token from the
  server's tokens file), or names nobody (``""``: a shared token, or the embedded loopback server), in
  which case the hello's ``device_id`` is the identity. A session belongs to the identity that opened it;
  its key is ``<identity>/<run_id>``.
* **Session secrets.** A hello's reply carries a fresh random secret; every later frame of the session
  must present it (compared in constant time) from the same transport identity. A hello for a session
  that is open (a reconnect of the same identity and run) keeps its state, issues a new secret and
  revokes the old one. Unknown sessions and wrong secrets get the same answer.
* **Replays.** A training frame whose step was already applied gets the stored reply only if it is the
  same frame (a retry); a different frame for that step is refused. ``set_state`` is accepted only between
  a hello and the session's next training step (the resume of a device checkpoint); later it is stale.
* **Quotas.** Sessions over all identities and per identity are capped; sessions idle longer than
  ``session_idle_s`` are checkpointed and closed (:meth:`FrameServer.expire_idle`), and resume with a hello.

Which model a frame trains and when steps happen is the business of a policy
(:mod:`lightning_mobillm.server.policies`), as Flower separates its server loop from its strategy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric import Fabric

from lightning_mobillm import protocol as P
from lightning_mobillm.engine import make_fabric
from lightning_mobillm.server.memory import release_free_memory
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.frames import PREAMBLE_BYTES, Frame, FrameError, decode_frame, encode_frame
from lightning_mobillm.transport.link import FRAME_SLACK_BYTES

log = logging.getLogger("lightning_mobillm.server")

__all__ = ["FrameServer", "SessionBase"]

#: what a refused session frame is told, whether the session is unknown, foreign or the secret is wrong
NO_SESSION = "unknown session or wrong secret; say hello (with resume: true to continue a session)"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-")


def check_name(what: str, value: str, max_len: int = 64) -> str:
    """A device-chosen name that ends up in keys and logs: 1-``max_len`` chars of ``[A-Za-z0-9_.@-]``."""
    if not 1 <= len(value) <= max_len or not set(value) <= _NAME_CHARS:
        raise FrameError(f"hello: {what} must be 1-{max_len} characters of [A-Za-z0-9_.@-]")
    return value


@dataclass
class SessionBase:
    """What dispatch keeps per session: its key, owner and secret, the training steps applied, the last
    training reply (for retries), when it was last used, and a lock that serialises its frames."""

    key: str
    owner: str = field(default="", kw_only=True)  # the identity that opened it
    transport_identity: str = field(default="", kw_only=True)  # what the transport named at hello ("" = nobody)
    secret: str = field(default="", kw_only=True)
    last_reply: tuple[int, bytes, bytes] | None = field(default=None, kw_only=True)  # step, frame digest, reply
    restorable: bool = field(default=True, kw_only=True)  # set_state allowed (until the next training step)
    last_seen: float = field(default=0.0, kw_only=True)
    bytes_in: int = field(default=0, kw_only=True)  # this session's frames and replies, as the server counts them
    bytes_out: int = field(default=0, kw_only=True)
    lock: threading.Lock = field(default_factory=threading.Lock, kw_only=True)

    @property
    def step(self) -> int:  # pragma: no cover - every session type defines it
        raise NotImplementedError


class FrameServer:
    """Turns request bytes into reply bytes: validates a frame against :attr:`schemas`, authorises it and
    dispatches it to ``_on_<kind>(frame, identity)`` for hellos and ``_on_<kind>(frame, session)`` for every
    other kind. Thread-safe; sessions are serialised by their own lock.

    Args:
        config: the server's settings (limits, quotas, workdir).
        fabric: the training engine's Fabric (made from ``config`` when None).
        clock: monotonic seconds, for idle expiry (tests pass their own).
    """

    #: the request kinds this server accepts and what each may carry
    schemas: dict = P.REQUEST_SCHEMAS
    #: the kinds that open a session (everything else must present a session and its secret)
    hello_kinds: tuple[str, ...] = (P.HELLO,)
    #: the kinds that decode activations and compute (at most ``max_concurrent_steps`` at once)
    compute_kinds: tuple[str, ...] = ()

    def __init__(self, config: ServerConfig | None = None, fabric: Fabric | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or ServerConfig()
        self.fabric = fabric or make_fabric(self.config)
        self.device = self.fabric.device
        self.clock = clock
        self.sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._compute = threading.BoundedSemaphore(self.config.max_concurrent_steps)
        self.frames_refused = 0
        self.sessions_expired = 0
        self.bytes_in = 0  # counted where frames are read and written, to cross-check the device's count
        self.bytes_out = 0
        self._last_sweep = clock()

    # ---- entry point ---------------------------------------------------------------------------
    def handle(self, data: bytes, identity: str = "") -> bytes:
        """One request: ``identity`` is what the transport authenticated ("" when it names nobody)."""
        with self._lock:
            self.bytes_in += len(data)
        # the server decides its own autograd mode: in-process, the caller may be inside Lightning's
        # inference_mode (validation hooks); over gRPC a worker thread starts with grad enabled anyway
        with torch.inference_mode(False), torch.enable_grad():
            reply, session = self._handle(data, identity)
        if len(reply) > self.config.max_reply_bytes + FRAME_SLACK_BYTES:
            log.warning("refused to send a reply of %d bytes (max_reply_mb=%d)", len(reply), self.config.max_reply_mb)
            reply = encode_frame(P.error_frame(
                f"the reply is {len(reply) / 2**20:.0f} MiB, over the server's max_reply_mb={self.config.max_reply_mb} "
                "(a side network's whole state with its optimizer is the largest reply); raise max_reply_mb in the "
                "server's config (for an embedded server, the strategy's `embedded.max_reply_mb`)"))
        with self._lock:
            self.bytes_out += len(reply)
            if session is not None:  # a session's own traffic, which only it may read back
                session.bytes_out += len(reply)
        if self.clock() - self._last_sweep > min(60.0, self.config.session_idle_s):
            self.expire_idle()
        return reply

    def _handle(self, data: bytes, identity: str) -> tuple[bytes, SessionBase | None]:
        session = None
        try:
            frame = decode_frame(data, self.schemas, max_bytes=self.config.max_frame_bytes)
            handler = getattr(self, f"_on_{frame.kind}")
            if frame.kind in self.hello_kinds:
                reply = handler(frame, identity)
                session = self.sessions.get(reply.header.get("session", ""))
                if session is not None:
                    session.bytes_in += len(data)
            else:
                session = self._authorised(frame, identity)
                session.last_seen = self.clock()
                session.bytes_in += len(data)
                if "step" in frame.header:
                    frame.header["_digest"] = _frame_digest(data)
                if frame.kind in self.compute_kinds:
                    with self._compute:
                        try:
                            reply = handler(frame, session)
                        finally:
                            if self.config.release_memory:
                                release_free_memory()
                else:
                    reply = handler(frame, session)
            if isinstance(reply, bytes):
                return reply, session
        except FrameError as err:
            with self._lock:
                self.frames_refused += 1
            log.warning("refused a frame: %s", err)
            reply = P.error_frame(str(err))
        except Exception as err:  # noqa: BLE001 - a bug must not take the server down
            with self._lock:
                self.frames_refused += 1
            log.exception("failed to handle a frame")
            reply = P.error_frame(f"server error: {type(err).__name__}")
        return encode_frame(reply), session

    # ---- authority -------------------------------------------------------------------------------
    def _authorised(self, frame: Frame, identity: str) -> Any:
        """The frame's session, if the caller owns it and presents its current secret."""
        session = self.sessions.get(frame.header["session"])
        if session is None or not hmac.compare_digest(session.transport_identity.encode(), identity.encode()):
            raise FrameError(NO_SESSION)
        if not hmac.compare_digest(session.secret.encode(), frame.header["secret"].encode()):
            raise FrameError(NO_SESSION)
        return session

    @staticmethod
    def owner_of(identity: str, device_id: str) -> str:
        """Who owns a session: the transport's identity, or the hello's device id when it names nobody."""
        return identity if identity else "device:" + check_name("device_id", device_id)

    def hello_key(self, frame: Frame, identity: str) -> tuple[str, str]:
        """A hello's owner and session key (``<owner>/<run_id>``), after checking its protocol version."""
        P.check_protocol(frame.header)
        owner = self.owner_of(identity, frame.header["device_id"])
        return owner, f"{owner}/{check_name('run_id', frame.header['run_id'])}"

    def _open_or_reuse(self, key: str, owner: str) -> Any | None:
        """Before building a session: the open session under ``key`` (a reconnect), or None after checking
        that a new one fits the caps."""
        self.expire_idle()
        with self._lock:
            live = self.sessions.get(key)
            if live is not None:
                return live
            if len(self.sessions) >= self.config.max_sessions:
                raise FrameError(f"too many open sessions ({self.config.max_sessions})")
            mine = sum(1 for s in self.sessions.values() if s.owner == owner)
            if mine >= self.config.max_sessions_per_identity:
                raise FrameError(f"{owner} already holds {mine} open sessions (max_sessions_per_identity)")
        return None

    def _admit(self, session: SessionBase, owner: str, identity: str) -> str:
        """Register ``session`` (new, or reconnected) for ``owner`` with a fresh secret; returns the secret."""
        session.owner = owner
        session.transport_identity = identity
        session.secret = secrets.token_hex(16)
        session.restorable = True
        session.last_seen = self.clock()
        with self._lock:
            self.sessions[session.key] = session
        return session.secret

    def _pop_session(self, session: SessionBase) -> None:
        with self._lock:
            if self.sessions.get(session.key) is session:
                del self.sessions[session.key]

    # ---- idle expiry -------------------------------------------------------------------------------
    def expire_idle(self, now: float | None = None) -> list[str]:
        """Checkpoint and close sessions idle for longer than ``session_idle_s``; returns their keys."""
        now = self.clock() if now is None else now
        self._last_sweep = now
        with self._lock:
            idle = [s for s in self.sessions.values() if now - s.last_seen > self.config.session_idle_s]
        expired = []
        for session in idle:
            if not session.lock.acquire(blocking=False):
                continue  # busy right now: not idle
            try:
                if now - session.last_seen <= self.config.session_idle_s:
                    continue
                self._on_expire(session)
                self._pop_session(session)
                expired.append(session.key)
            except Exception:  # noqa: BLE001 - keep it open rather than lose what it holds
                log.exception("could not checkpoint idle session %s; it stays open", session.key)
            finally:
                session.lock.release()
        if expired:
            with self._lock:
                self.sessions_expired += len(expired)
            log.info("closed %d idle session(s) after checkpointing them: %s", len(expired), expired)
        return expired

    def _on_expire(self, session: SessionBase) -> None:
        """Persist what an idle session holds before it is closed (override; called with its lock held)."""

    # ---- replays -----------------------------------------------------------------------------------
    @staticmethod
    def _replayed(session: SessionBase, frame: Frame) -> bytes | None:
        """The stored reply when this very frame's step was already applied (a retry is never applied
        twice); raises on a different frame for that step, or a step out of order. Call with the session's
        lock held."""
        step = frame.header["step"]
        if session.last_reply is not None and session.last_reply[0] == step:
            if hmac.compare_digest(session.last_reply[1], frame.header["_digest"]):
                return session.last_reply[2]
            raise FrameError(f"step {step} was already applied with another frame; stale {frame.kind} refused")
        if step != session.step:
            raise FrameError(f"out-of-order {frame.kind} frame: got step {step}, expected {session.step}")
        return None

    @staticmethod
    def _remember(session: SessionBase, frame: Frame, reply: Frame) -> bytes:
        """Encode a training reply and keep it for a retry of the same frame; closes the restore window."""
        data = encode_frame(reply)
        session.last_reply = (frame.header["step"], frame.header["_digest"], data)
        session.restorable = False
        return data


def _frame_digest(data: bytes) -> bytes:
    """What makes two training frames the same frame: their header without the secret (which a reconnect
    renews) and their tensor bytes."""
    (header_len,) = struct.unpack_from(">I", data, PREAMBLE_BYTES - 4)
    header = json.loads(bytes(data[PREAMBLE_BYTES:PREAMBLE_BYTES + header_len]))
    header.pop("secret", None)
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(memoryview(data)[PREAMBLE_BYTES + header_len:])
    return h.digest()
