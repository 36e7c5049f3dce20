"""The server side of Fed MobiLLM on Flower (no ``flwr`` import): Flower replies become our link's frames.

A node's reply to ``train.upload`` holds its ``fed_hello`` header and its upload's parts (headers and tensors,
see :class:`~lightning_mobillm.flower.device.FlowerDevice`). :class:`FederationBridge` turns them into the frames a
device would send over our link (``fed_hello``, then one ``fed_upload`` per part with the session, secret and
``seq`` the server gave) and hands their bytes to :meth:`FedServer.handle
<lightning_mobillm.server.dispatch.FrameServer.handle>` under the node's identity ``flower-node-<node id>`` (the
SuperLink authenticated the node; with SuperNode authentication that is the node's key). So Flower's uploads meet
exactly the schemas (an unknown header key or tensor, e.g. a label, is refused), bounds, quotas, allow-list and
retry rules of ``serve --role fed``, and train the same shared-model policy
(:meth:`~lightning_mobillm.server.fed.FedServer.step_pending`). A refused part changes nothing; the parts the
server acknowledged before it stay acknowledged (as on our link).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lightning_mobillm import protocol as P
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame

log = logging.getLogger(__name__)

__all__ = ["FederationBridge", "NodeRecord"]


@dataclass
class NodeRecord:
    """What the server side knows of a node: its identity, declared type, what it had accepted or refused."""

    identity: str
    backbone_type: str | None = None
    session: str | None = None
    secret: str | None = field(default=None, repr=False)
    seq: int = 0
    parts_accepted: int = 0
    samples_accepted: int = 0
    refused: list[str] = field(default_factory=list)
    arrival_s: list[float] = field(default_factory=list)
    device_metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    #: what crossed: the names of the hello's keys, the parts' header keys and tensors (an audit trail)
    received: dict[str, set[str]] = field(default_factory=lambda: {"hello": set(), "header": set(), "tensors": set()})

    def summary(self) -> dict[str, Any]:
        return {"identity": self.identity, "backbone_type": self.backbone_type, "parts_accepted": self.parts_accepted,
                "samples_accepted": self.samples_accepted, "refused": list(self.refused),
                "arrival_s": list(self.arrival_s), "device": dict(self.device_metrics),
                "evaluation": dict(self.evaluation), "received": {k: sorted(v) for k, v in self.received.items()}}


class FederationBridge:
    """Feeds Flower nodes' uploads to a :class:`~lightning_mobillm.server.fed.FedServer` as frames.

    Args:
        server: the federation's server (``background=False``: the ServerApp drives its training loop).
        clock: seconds since the run started (arrival times in the summary).
    """

    def __init__(self, server: Any, clock: Any = None) -> None:
        self.server = server
        self._t0 = time.monotonic()
        self.clock = clock or (lambda: time.monotonic() - self._t0)
        self.nodes: dict[str, NodeRecord] = {}

    @staticmethod
    def identity(node_id: int | str) -> str:
        return f"flower-node-{node_id}"

    def node(self, node_id: int | str) -> NodeRecord:
        identity = self.identity(node_id)
        return self.nodes.setdefault(identity, NodeRecord(identity))

    def _call(self, frame: Frame, identity: str) -> Frame:
        try:
            data = encode_frame(frame)
        except Exception as err:  # noqa: BLE001 - e.g. a header value JSON cannot hold: refused like a bad frame
            raise ValueError(f"{frame.kind}: not a well-formed frame ({type(err).__name__}: {err})") from None
        reply = decode_frame(self.server.handle(data, identity), P.FED_REPLY_SCHEMAS, require_finite=False)
        if reply.kind == P.ERROR:
            raise ValueError(reply.header["message"])
        return reply

    def accept(self, node_id: int | str, hello: Mapping[str, Any],
               parts: Sequence[tuple[Mapping[str, Any], Mapping[str, Tensor]]],
               device_metrics: Mapping[str, float] | None = None) -> int:
        """A node's upload: its hello, then each part as a ``fed_upload`` frame. Returns the samples accepted
        now; a refusal is logged and recorded in the node's ``refused`` (the hello's refusal ends the upload,
        a part's refusal skips that part)."""
        record = self.node(node_id)
        record.received["hello"].update(map(str, hello))
        for header, tensors in parts:
            record.received["header"].update(map(str, header))
            record.received["tensors"].update(map(str, tensors))
        if device_metrics:
            record.device_metrics = {k: float(v) for k, v in device_metrics.items()}
        try:
            reply = self._call(Frame(kind=P.FED_HELLO, header=dict(hello)), record.identity)
        except ValueError as err:
            record.refused.append(f"fed_hello: {err}")
            log.warning("flower node %s: hello refused: %s", record.identity, err)
            return 0
        record.session, record.secret = reply.header["session"], reply.header["secret"]
        record.seq = int(reply.header["seq"])
        record.backbone_type = str(hello.get("backbone_type"))
        accepted = 0
        for header, tensors in parts:
            frame = Frame(kind=P.FED_UPLOAD, header={**header, "session": record.session, "secret": record.secret,
                                                    "seq": record.seq}, tensors=dict(tensors))
            try:
                ack = self._call(frame, record.identity)
            except ValueError as err:
                record.refused.append(f"fed_upload: {err}")
                log.warning("flower node %s: an upload part was refused: %s", record.identity, err)
                continue
            record.seq += 1
            record.parts_accepted += 1
            accepted += int(ack.header["accepted"])
        record.samples_accepted += accepted
        record.arrival_s.append(self.clock())
        return accepted

    def download(self, node_id: int | str) -> tuple[dict[str, Any], dict[str, Tensor], int]:
        """The node's evaluation parts (``fed_download`` in its session): config, tensors and the shared
        model's optimizer steps so far."""
        record = self.node(node_id)
        if record.session is None:
            raise ValueError(f"{record.identity} has no session (it never uploaded)")
        reply = self._call(Frame(kind=P.FED_DOWNLOAD, header={"session": record.session, "secret": record.secret}),
                           record.identity)
        state = P.unpack_state(reply.header["skeleton"], reply.tensors["state"])
        return dict(reply.header["config"]), dict(state), int(reply.header["steps"])

    def summary(self) -> dict[str, Any]:
        """Per-node records and the federation's statistics (the trainer's: devices, types, steps)."""
        trainer = self.server.trainer
        return {"nodes": {k: r.summary() for k, r in sorted(self.nodes.items())},
                "statistics": trainer.statistics() if trainer is not None else None,
                "frames_refused": self.server.frames_refused}
