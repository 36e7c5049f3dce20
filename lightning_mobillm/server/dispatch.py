"""Dispatch: from request bytes to reply bytes, apart from what training does with a frame.

:class:`FrameServer` decodes and validates every frame against its role's schemas, refuses what does not
fit with an error frame (the server keeps running and the refused frame changes nothing), counts bytes,
keeps the table of open sessions within its cap, and guards against replays: a training frame whose step
was already applied gets the stored reply and is never applied twice. Which model a frame trains and when
steps happen is the business of a policy (:mod:`lightning_mobillm.server.policies`), as Flower separates
its server loop from its strategy.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric import Fabric

from lightning_mobillm import protocol as P
from lightning_mobillm.server.engine import make_fabric
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.frames import Frame, FrameError, decode_frame, encode_frame

log = logging.getLogger("lightning_mobillm.server")

__all__ = ["FrameServer", "SessionBase"]


@dataclass
class SessionBase:
    """What dispatch keeps per session: its key, the training steps applied, the last training reply (for
    retries) and a lock that serialises the session's frames."""

    key: str
    last_reply: tuple[int, bytes] | None = field(default=None, kw_only=True)
    lock: threading.Lock = field(default_factory=threading.Lock, kw_only=True)

    @property
    def step(self) -> int:  # pragma: no cover - every session type defines it
        raise NotImplementedError


class FrameServer:
    """Turns request bytes into reply bytes: validates a frame against :attr:`schemas` and dispatches it to
    ``_on_<kind>``. Thread-safe; sessions are serialised by their own lock."""

    #: the request kinds this server accepts and what each may carry
    schemas: dict = P.REQUEST_SCHEMAS

    def __init__(self, config: ServerConfig | None = None, fabric: Fabric | None = None) -> None:
        self.config = config or ServerConfig()
        self.fabric = fabric or make_fabric(self.config)
        self.device = self.fabric.device
        self.sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.frames_refused = 0
        self.bytes_in = 0  # counted where frames are read and written, to cross-check the device's count
        self.bytes_out = 0

    # ---- entry point ---------------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes:
        with self._lock:
            self.bytes_in += len(data)
        # the server decides its own autograd mode: in-process, the caller may be inside Lightning's
        # inference_mode (validation hooks); over gRPC a worker thread starts with grad enabled anyway
        with torch.inference_mode(False), torch.enable_grad():
            reply = self._handle(data)
        with self._lock:
            self.bytes_out += len(reply)
        return reply

    def _handle(self, data: bytes) -> bytes:
        try:
            frame = decode_frame(data, self.schemas, max_bytes=self.config.max_frame_mb * 2**20)
            reply = getattr(self, f"_on_{frame.kind}")(frame)
            if isinstance(reply, bytes):
                return reply
        except FrameError as err:
            with self._lock:
                self.frames_refused += 1
            log.warning("refused a frame: %s", err)
            reply = P.error_frame(str(err))
        except Exception as err:  # noqa: BLE001 - a bug must not take the server down
            with self._lock:
                self.frames_refused += 1
            log.exception("failed to handle a frame")
            reply = P.error_frame(f"server error: {type(err).__name__}: {err}")
        return encode_frame(reply)

    # ---- sessions --------------------------------------------------------------------------------
    def _check_capacity(self, key: str) -> None:
        with self._lock:
            if key not in self.sessions and len(self.sessions) >= self.config.max_sessions:
                raise FrameError(f"too many open sessions ({self.config.max_sessions})")

    def _add_session(self, session: SessionBase) -> bool:
        """Register ``session``; True when it replaced one under the same key."""
        with self._lock:
            replaced = session.key in self.sessions
            self.sessions[session.key] = session
        return replaced

    def _session(self, frame: Frame) -> Any:
        key = frame.header["session"]
        session = self.sessions.get(key)
        if session is None:
            raise FrameError(f"unknown session {key!r}; send a hello first")
        return session

    def _pop_session(self, frame: Frame) -> Any:
        with self._lock:
            return self.sessions.pop(frame.header["session"], None)

    @staticmethod
    def _replayed(session: SessionBase, step: int, kind: str) -> bytes | None:
        """The stored reply when ``step`` was already applied (a retried frame is never applied twice);
        raises on a step out of order. Call with the session's lock held."""
        if session.last_reply is not None and session.last_reply[0] == step:
            return session.last_reply[1]
        if step != session.step:
            raise FrameError(f"out-of-order {kind} frame: got step {step}, expected {session.step}")
        return None

    @staticmethod
    def _remember(session: SessionBase, step: int, reply: Frame) -> bytes:
        """Encode a training reply and keep it for a retry of the same step."""
        data = encode_frame(reply)
        session.last_reply = (step, data)
        return data
