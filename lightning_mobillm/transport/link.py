"""Links between a device and a server: a :class:`Link` interface and its two implementations.

* :class:`GrpcLink`, the real network link. The gRPC service has a single unary method, ``/lightning_mobillm.Link/Exchange``: the device sends a frame
(bytes, see :mod:`lightning_mobillm.transport.frames`) and receives a frame back. The payload is passed
through gRPC untouched, so the bytes counted here are exactly the frame bytes on the wire (gRPC adds
its own few bytes of HTTP/2 framing, which are not part of a frame).

The device's token travels as per-call metadata and is checked before the request bytes are looked at.

* :class:`InProcessLink` hands the encoded frame bytes to a server's handler in the same process: frames
  are still encoded, validated and counted exactly as on the network; only the network is skipped. For
  fast unit tests and many-device simulation.

Both send queued frames from one background thread, in submission order (:meth:`Link.submit`).
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

log = logging.getLogger(__name__)

SERVICE = "lightning_mobillm.Link"
METHOD = f"/{SERVICE}/Exchange"
TOKEN_KEY = "x-mobillm-token"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 2**20


class LinkError(RuntimeError):
    """The link could not deliver a frame (server unreachable, refused, or failing)."""


@dataclass
class LinkStats:
    """Bytes and calls counted where frames are serialized (thread-safe)."""

    bytes_up: int = 0
    bytes_down: int = 0
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, up: int, down: int) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down
            self.calls += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "calls": self.calls}


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def serve_link(
    handler: Callable[[bytes], bytes],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server whose single method passes request bytes to ``handler``.

    Args:
        handler: maps request frame bytes to reply frame bytes. It must not raise for bad input (it
            should reply with an error frame); an exception becomes an INTERNAL status for that call only.
        host, port: where to listen; ``port=0`` picks a free port.
        token: when set, calls without this token in their metadata are refused (UNAUTHENTICATED)
            before the request is decoded.

    Returns:
        The started server and the port it is bound to.
    """
    expected = token.encode() if token else None

    def exchange(request: bytes, context: grpc.ServicerContext) -> bytes:
        if expected is not None:
            given = dict(context.invocation_metadata()).get(TOKEN_KEY, "")
            if not hmac.compare_digest(given.encode(), expected):
                log.warning("refused a call from %s: wrong or missing token", context.peer())
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing device token")
        return handler(request)

    rpc = grpc.unary_unary_rpc_method_handler(exchange)  # no (de)serializers: raw bytes both ways
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mobillm-link"),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, {"Exchange": rpc})],
        options=_channel_options(max_message_bytes),
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise LinkError(f"could not listen on {host}:{port}")
    server.start()
    return server, bound


class Link(ABC):
    """The device's end of a link: synchronous calls and an ordered asynchronous queue.

    ``submit`` sends frames one at a time from a single background thread, so frames reach the server
    in the order they were submitted while the caller goes on (this is how device forward passes
    overlap the server's training steps). Every byte is counted in :attr:`stats` where it is sent.
    """

    address: str

    def __init__(self) -> None:
        self.stats = LinkStats()
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mobillm-sender")

    @abstractmethod
    def _exchange_bytes(self, request: bytes) -> bytes:
        """Deliver one request and return the reply (raising :class:`LinkError` when undeliverable)."""

    def call(self, request: bytes) -> bytes:
        """Send one frame and wait for the reply."""
        reply = self._exchange_bytes(request)
        self.stats.add(len(request), len(reply))
        return reply

    def submit(self, request: bytes) -> Future[bytes]:
        """Queue a frame; frames are sent in submission order. The future holds the reply bytes."""
        return self._sender.submit(self.call, request)

    def close(self) -> None:
        self._sender.shutdown(wait=True, cancel_futures=True)


class InProcessLink(Link):
    """A link to a server handler (``bytes -> bytes``) living in this process; no network, same frames.

    Args:
        handler: the server's entry point (e.g. ``SideServer.handle``), which never raises for bad input.
        max_message_bytes: requests larger than this are refused, as the gRPC link refuses them.
    """

    def __init__(self, handler: Callable[[bytes], bytes], *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 address: str = "inprocess") -> None:
        super().__init__()
        self.address = address
        self._handler = handler
        self._max = max_message_bytes

    def _exchange_bytes(self, request: bytes) -> bytes:
        if len(request) > self._max:
            raise LinkError(f"call to {self.address} failed: RESOURCE_EXHAUSTED: request of {len(request)} bytes "
                            f"exceeds {self._max}")
        # bytes(...) so the handler never holds a view of the caller's buffer, as with a real network
        return bytes(self._handler(bytes(request)))


class GrpcLink(Link):
    """The gRPC link (see the module docstring); waits up to ``connect_timeout`` for the server."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        connect_timeout: float = 30.0,
        call_timeout: float = 600.0,
        retries: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__()
        self.address = address
        self._metadata = ((TOKEN_KEY, token),) if token else ()
        self._call_timeout = call_timeout
        self._retries = retries
        self._channel = grpc.insecure_channel(address, options=_channel_options(max_message_bytes))
        self._exchange = self._channel.unary_unary(METHOD)
        self._wait_ready(connect_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                grpc.channel_ready_future(self._channel).result(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
                return
            except grpc.FutureTimeoutError:
                if time.monotonic() >= deadline:
                    self.close()
                    raise LinkError(
                        f"server at {self.address} is unreachable (tried for {timeout:.0f} s, {attempt} attempts)"
                    ) from None

    def _exchange_bytes(self, request: bytes) -> bytes:
        """One call; retries transient failures (UNAVAILABLE) a bounded number of times."""
        for attempt in range(self._retries + 1):
            try:
                return self._exchange(request, metadata=self._metadata, timeout=self._call_timeout)
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self._retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise LinkError(f"call to {self.address} failed: {code.name}: {err.details()}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        super().close()
        self._channel.close()
