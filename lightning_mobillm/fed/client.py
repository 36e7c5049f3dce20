"""The device's side of Fed MobiLLM over our link (``serve --role fed``; the frames are in ``docs/protocol.md``).

:class:`FedClient` speaks the fed role's frames over a :class:`~lightning_mobillm.transport.link.Link`
(:class:`~lightning_mobillm.transport.link.GrpcLink` to a server on the network, or
:class:`~lightning_mobillm.transport.link.InProcessLink` to a server object in this process)::

    client = FedClient.connect("server:50051", token, device_id="phone-7", run_id="bbc", backbone_type=kind,
                               k=18, width=576, out_dim=16)
    client.hello()                        # the federation's K, d*, target space; the device's quota
    for upload in worker.upload(shard).uploads:
        client.upload(upload)             # acknowledgements only
    model = client.download()             # trunk, this type's projection, this device's head
    scores = model.scores(acts, zero_shot_logits, transform)   # evaluated on the device
    client.close()                        # bye

**Retries are safe.** An upload is cut into frames of at most ``max_samples_per_frame`` samples (a header
holds every sample's key, and a header is at most 64 KiB). Each frame gets the next ``seq`` when it is queued
and keeps it, and its bytes, until it is acknowledged: a frame whose reply was lost is sent again as it was,
and the server answers a frame it already acknowledged with the stored acknowledgement instead of caching it
twice. After the link fails for good, :meth:`FedClient.reconnect` says hello again with ``resume: true`` on a
new link and :meth:`FedClient.flush` sends what was not acknowledged.

No Lightning here: the client needs torch, the protocol and the link; :meth:`FedClient.download` imports the
device-side model (:mod:`lightning_mobillm.fed.model`) when it is called.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_mobillm import protocol as P
from lightning_mobillm.client import ServerError
from lightning_mobillm.fed.upload import Upload
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame
from lightning_mobillm.transport.link import GrpcLink, Link, LinkError

if TYPE_CHECKING:
    from lightning_mobillm.fed.model import FedDeviceModel, FedDownload
    from lightning_mobillm.transport.security import TlsClientConfig

log = logging.getLogger(__name__)

__all__ = ["FedClient"]

#: codec parts that describe the whole frame rather than one sample (int4's width, the outlier channels)
_WHOLE_PARTS = frozenset({"acts.d", "acts.oidx"})


@dataclass
class _Outgoing:
    """A frame of an upload, kept (with its ``seq``) until the server acknowledges it."""

    seq: int
    keys: list[str]
    tensors: dict[str, Tensor]


class FedClient:
    """One device's conversation with a Fed MobiLLM server (see the module docstring).

    Args:
        link: the link to the server (the client closes it in :meth:`close`).
        device_id, run_id: the hello's names (1-64 characters of ``[A-Za-z0-9_.@-]``). With per-device tokens
            the server files the device under its token's identity; otherwise as ``device:<device_id>``.
        backbone_type: the device's :attr:`~lightning_mobillm.fed.alignment.BackboneType.key`.
        k: the federation's number of aligned taps (the device taps those layers).
        width: the backbone's hidden size.
        out_dim: the width of the device's targets (its transform's ``out_dim``).
        target_space: ``device``, ``federation`` or ``plain`` (see :class:`~lightning_mobillm.fed.upload.Upload`).
        codec: the codec of every upload.
        max_samples_per_frame: samples per ``fed_upload`` frame (an upload is cut into as many frames as needed).
        retries: how often a frame is sent again after the link failed to deliver it (the same bytes).
    """

    def __init__(self, link: Link, *, device_id: str, run_id: str, backbone_type: str, k: int, width: int,
                 out_dim: int, target_space: str = "device", codec: str = "int8", max_samples_per_frame: int = 512,
                 retries: int = 2) -> None:
        if isinstance(max_samples_per_frame, bool) or not isinstance(max_samples_per_frame, int) or not (
                1 <= max_samples_per_frame <= 1024):
            raise ValueError(f"max_samples_per_frame must be in [1, 1024], got {max_samples_per_frame!r}")
        self.link = link
        self.device_id, self.run_id = device_id, run_id
        self.backbone_type, self.k, self.width, self.out_dim = backbone_type, k, width, out_dim
        self.target_space, self.codec = target_space, codec
        self.max_samples_per_frame = max_samples_per_frame
        self.retries = retries
        self.session: str | None = None
        self.secret: str | None = None  # never logged
        self.federation: dict[str, Any] = {}  # the last hello's reply (without the secret)
        self.seq = 0  # the seq the next queued frame gets
        self._outbox: deque[_Outgoing] = deque()

    @classmethod
    def connect(cls, address: str, token: str | None = None, *, tls: TlsClientConfig | None = None,
                connect_timeout: float = 60.0, call_timeout: float = 600.0, **kwargs: Any) -> FedClient:
        """A client over gRPC to ``host:port`` (``kwargs`` are the constructor's)."""
        return cls(GrpcLink(address, token, tls=tls, connect_timeout=connect_timeout, call_timeout=call_timeout),
                   **kwargs)

    def __enter__(self) -> FedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def traffic(self) -> dict[str, int]:
        """Bytes up and down and calls over the link, counted where frames are serialised."""
        return self.link.stats.snapshot()

    @property
    def unacknowledged(self) -> int:
        """Samples queued or sent whose frames the server has not acknowledged yet."""
        return sum(len(out.keys) for out in self._outbox)

    # ---- the conversation ---------------------------------------------------------------------------
    def hello(self, resume: bool = False) -> dict[str, Any]:
        """Open (or reconnect to) the session; with ``resume`` continue one that a restarted server holds in
        its checkpoint. Returns the federation's ``k``, ``d_star``, ``out_dim``, ``target_space``, the next
        ``seq``, this device's ``samples`` and ``quota_left``. A hello the federation does not admit (another K,
        target width or space, a type outside the allow-list) raises :class:`ServerError` naming why."""
        header = {"protocol": P.PROTOCOL_VERSION, "device_id": self.device_id, "run_id": self.run_id,
                  "backbone_type": self.backbone_type, "k": self.k, "width": self.width, "out_dim": self.out_dim,
                  "target_space": self.target_space, "codec": self.codec}
        if resume:
            header["resume"] = True
        reply = self._decode(self.link.call(encode_frame(Frame(kind=P.FED_HELLO, header=header))))
        self.session, self.secret = reply.header["session"], reply.header["secret"]
        self.federation = {k: v for k, v in reply.header.items() if k not in ("secret", "kind")}
        self._renumber(int(reply.header["seq"]))
        return dict(self.federation)

    def _renumber(self, server_seq: int) -> None:
        """Fit the frames not yet acknowledged to the server's count: the first may be the server's last
        acknowledged frame (its reply was lost) or its next; otherwise (a new conversation) they are numbered
        from the server's next ``seq``."""
        if self._outbox and self._outbox[0].seq not in (server_seq - 1, server_seq):
            for i, out in enumerate(self._outbox):
                out.seq = server_seq + i
        self.seq = self._outbox[-1].seq + 1 if self._outbox else server_seq

    def reconnect(self, link: Link, resume: bool = True) -> dict[str, Any]:
        """Replace a failed link (closing the old one) and say hello again; the frames not acknowledged stay
        queued for :meth:`flush`."""
        old, self.link = self.link, link
        try:
            old.close()
        except Exception:  # noqa: BLE001 - a broken link may fail to close
            log.debug("closing the old link failed", exc_info=True)
        return self.hello(resume=resume)

    def upload(self, upload: Upload) -> list[dict[str, Any]]:
        """Queue ``upload`` (cut into frames of at most ``max_samples_per_frame`` samples) and send everything
        queued: returns the acknowledgements (``seq``, ``accepted``, ``samples``, ``quota_left``). A refused
        frame raises :class:`ServerError` and is dropped from the queue (nothing of it was taken); the frames
        after it stay queued."""
        for name, ours, theirs in (("backbone type", self.backbone_type, upload.backbone_type),
                                   ("codec", self.codec, upload.codec), ("target space", self.target_space,
                                                                          upload.target_space)):
            if ours != theirs:
                raise ValueError(f"this client's {name} is {ours!r}, the upload's {theirs!r}")
        n = len(upload.keys)
        if n < 1:
            raise ValueError("an upload needs at least one sample")
        for start in range(0, n, self.max_samples_per_frame):
            stop = min(start + self.max_samples_per_frame, n)
            tensors = {name: (t if name in _WHOLE_PARTS or (start, stop) == (0, n) else t[start:stop])
                       for name, t in upload.acts.items()}
            tensors["targets"] = upload.targets[start:stop].float()
            self._outbox.append(_Outgoing(self.seq, list(upload.keys[start:stop]), tensors))
            self.seq += 1
        return self.flush()

    def flush(self) -> list[dict[str, Any]]:
        """Send the queued frames in order, each until it is acknowledged (up to ``retries`` more times when
        the link fails: the same frame again); returns their acknowledgements."""
        acks = []
        while self._outbox:
            out = self._outbox[0]
            try:
                reply = self._request(P.FED_UPLOAD, {"seq": out.seq, "codec": self.codec, "keys": out.keys},
                                      out.tensors, retries=self.retries)
            except ServerError:
                self._outbox.popleft()  # refused: nothing of it was taken, and its seq is free again
                for later in self._outbox:
                    later.seq -= 1
                self.seq -= 1
                raise
            self._outbox.popleft()
            acks.append({k: v for k, v in reply.header.items() if k != "kind"})
        return acks

    def download_parts(self) -> FedDownload:
        """This device's evaluation parts: the trunk, its type's projection and its own head (plain config
        and tensors)."""
        from lightning_mobillm.fed.model import FedDownload  # the device-side model: only when downloading

        reply = self._request(P.FED_DOWNLOAD, {})
        state = P.unpack_state(reply.header["skeleton"], reply.tensors["state"])
        config = reply.header.get("config")
        if (not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values())
                or not isinstance(config, dict) or config.get("backbone_type") != self.backbone_type):
            raise ServerError("the server's download is not this device's parts")
        return FedDownload(config, state)

    def download(self) -> FedDeviceModel:
        """:meth:`download_parts` built into the device-side model (eval mode)."""
        return self.download_parts().build()

    def stats(self) -> dict[str, Any]:
        """This device's statistics (``device``: uploads, samples, optimizer steps its data took part in),
        the federation's ``totals``, ``queued_samples`` (this device's, waiting for their arrival steps),
        ``quota_left`` and this session's ``bytes_in`` / ``bytes_out`` as the server counted them."""
        reply = self._request(P.FED_STATS, {})
        return {k: v for k, v in reply.header.items() if k != "kind"}

    def bye(self) -> None:
        """End the session (the federation keeps this device's uploads and head)."""
        if self.session is not None:
            self._request(P.BYE, {})
            self.session = self.secret = None

    def close(self) -> None:
        """Say bye (when a session is open; failures ignored) and close the link."""
        try:
            self.bye()
        except Exception:  # noqa: BLE001 - an unreachable server needs no goodbye
            log.debug("no goodbye: the server did not answer", exc_info=True)
        finally:
            self.session = self.secret = None
            self.link.close()

    # ---- frames -------------------------------------------------------------------------------------
    def _request(self, kind: str, header: dict[str, Any], tensors: dict[str, Tensor] | None = None,
                 retries: int = 0) -> Frame:
        if self.session is None or self.secret is None:
            raise RuntimeError("no session: say hello first")
        for attempt in range(retries + 1):
            frame = Frame(kind=kind, header={"session": self.session, "secret": self.secret, **header},
                          tensors=tensors or {})
            try:
                return self._decode(self.link.call(encode_frame(frame)))
            except LinkError as err:
                if attempt == retries:
                    raise
                log.info("sending %s again after the link failed: %s", kind, err)
        raise AssertionError("unreachable")

    @staticmethod
    def _decode(data: bytes) -> Frame:
        frame = decode_frame(data, P.FED_REPLY_SCHEMAS, require_finite=False)
        if frame.kind == P.ERROR:
            raise ServerError(f"server refused a frame: {frame.header['message']}")
        return frame
