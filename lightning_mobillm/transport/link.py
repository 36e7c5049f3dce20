"""Links between a device and a server: a :class:`Link` interface and its two implementations.

* :class:`GrpcLink`, the real network link. The gRPC service has a single unary method,
  ``/lightning_mobillm.Link/Exchange``: the device sends a frame (bytes, see
  :mod:`lightning_mobillm.transport.frames`) and receives a frame back. The payload is passed through gRPC
  untouched, so the bytes counted here are exactly the frame bytes on the wire (gRPC adds its own few
  bytes of HTTP/2 framing, and TLS its records, which are not part of a frame). With a
  :class:`~lightning_mobillm.transport.security.TlsClientConfig` the link runs over TLS (mutual TLS with
  a client certificate).

  The device's token travels as per-call metadata (``x-mobillm-token``). :func:`serve_link` checks it
  in a server interceptor, on the call's headers, *before the request message is read*: a refused call
  gets UNAUTHENTICATED without its body being received, decoded or size-checked, and without holding a
  worker thread while a slow body trickles in (why this holds in grpcio: :class:`_Authenticator`). An
  accepted call reaches the handler with the identity its token names
  (:class:`~lightning_mobillm.transport.security.Credentials`). The server also bounds message size,
  concurrent calls, and pings and idle connections (keepalive).

* :class:`InProcessLink` hands the encoded frame bytes to a server's handler in the same process: frames
  are still encoded, validated and counted exactly as on the network; only the network is skipped. For
  fast unit tests and many-device simulation.

Both send queued frames from one background thread, in submission order (:meth:`Link.submit`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from lightning_mobillm.transport.security import Credentials, TlsClientConfig, TlsServerConfig

log = logging.getLogger(__name__)

SERVICE = "lightning_mobillm.Link"
METHOD = f"/{SERVICE}/Exchange"
TOKEN_KEY = "x-mobillm-token"
#: room for a frame's JSON header and safetensors table beyond its ``max_frame_mb`` of tensors
FRAME_SLACK_BYTES = 2**20
#: ``ServerConfig().max_frame_mb`` (128 MiB) plus the slack: the largest request by default
DEFAULT_MAX_MESSAGE_BYTES = 128 * 2**20 + FRAME_SLACK_BYTES
#: ``ServerConfig().max_reply_mb`` (1 GiB) plus the slack: the largest reply by default. Replies are the server's
#: own (a side network's whole state with its optimizer is 199 MB on Qwen2.5-1.5B), requests are untrusted input:
#: each way has its own bound.
DEFAULT_MAX_REPLY_BYTES = 1024 * 2**20 + FRAME_SLACK_BYTES


class LinkError(RuntimeError):
    """The link could not deliver a frame (server unreachable, refused, or failing); ``code`` names the gRPC
    status when there was one (``UNAVAILABLE``: the server could not be reached, retries included)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


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


def _channel_options(max_send_bytes: int, max_receive_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_send_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes),
    ]


def _server_options(max_message_bytes: int, max_reply_bytes: int, keepalive_s: float,
                    max_connection_idle_s: float) -> list[tuple[str, int]]:
    """Message limits and connection hygiene for a server that untrusted devices reach."""
    keepalive_ms = max(1000, int(keepalive_s * 1000))
    return [
        *_channel_options(max_reply_bytes, max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port fails to bind instead of sharing it
        # ping a connection every keepalive_s (with or without calls) and drop it if the ping is not
        # answered within 20 s: dead peers do not hold connections
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a client may ping no more often than keepalive_s; after 2 pings too many it is disconnected
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms),
        ("grpc.http2.max_ping_strikes", 2),
        # connections without a call for this long are closed (a device reconnects transparently)
        ("grpc.max_connection_idle_ms", max(1000, int(max_connection_idle_s * 1000))),
    ]


def _token_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == TOKEN_KEY:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def _refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """The handler of a refused call. Registered as *stream*-unary so that gRPC hands it a request
    iterator it never advances: the request message is never asked for (see :class:`_Authenticator`)."""

    def refuse(_request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        context.abort(code, details)
        raise AssertionError("unreachable")  # abort raises

    return grpc.stream_unary_rpc_method_handler(refuse)


_UNAUTHENTICATED = _refusal(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing device token")


class _Admission:
    """How many accepted calls are in the server (running, or waiting for a worker), in all and per
    identity; a call that would pass either bound is refused before its body is read."""

    def __init__(self, max_calls: int, max_calls_per_identity: int) -> None:
        self.max_calls, self.max_calls_per_identity = max_calls, max_calls_per_identity
        self._lock = threading.Lock()
        self._calls = 0
        self._per_identity: dict[str, int] = {}

    def enter(self, identity: str) -> str | None:
        """Count a call in; returns why it is refused instead (None: admitted)."""
        with self._lock:
            mine = self._per_identity.get(identity, 0)
            if self._calls >= self.max_calls:
                return f"the server has {self._calls} calls in progress (max_concurrent_rpcs)"
            if identity and mine >= self.max_calls_per_identity:  # "": open or shared token, one pool for all
                return f"{identity} has {mine} calls in progress (max_calls_per_identity)"
            self._calls += 1
            self._per_identity[identity] = mine + 1
            return None

    def leave(self, identity: str) -> None:
        with self._lock:
            self._calls -= 1
            left = self._per_identity[identity] - 1
            if left:
                self._per_identity[identity] = left
            else:
                del self._per_identity[identity]


class _Authenticator(grpc.ServerInterceptor):
    """Checks a call's token (metadata only) and admits it, before its request message is read.

    grpcio's sync server (``grpc/_server.py``) runs interceptors in ``_find_method_handler``, on its
    serving thread, as soon as a call's headers arrive: no worker thread is taken and nothing of the
    request message has been asked for. Only the returned handler decides when the message is read: for
    a unary-request handler, ``_handle_unary_unary`` gives the worker a thunk (``_unary_request``) that
    starts a receive and blocks until the whole message is in, so a refusal made in the handler would come
    after the body (and a slow body would hold the worker). Every call therefore gets a stream-unary
    handler: ``_handle_stream_unary`` gives it a lazy ``_RequestIterator`` and always calls it. A refused
    call (a wrong token: UNAUTHENTICATED; too many calls in progress: RESOURCE_EXHAUSTED) aborts without
    advancing it, so no receive is ever started and the worker is free at once. An accepted call reads its
    one message itself and runs the handler with its identity; its admission is counted from here to the
    end of that handler, whatever happens (this is why the server does not use gRPC's
    ``maximum_concurrent_rpcs``, which counts calls before this check, so that unauthenticated calls
    would crowd out devices).
    """

    def __init__(self, credentials: Credentials, admission: _Admission,
                 handler: Callable[[bytes, str], bytes]) -> None:
        self._credentials = credentials
        self._admission = admission
        self._handler = handler

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method != METHOD:
            return continuation(handler_call_details)
        try:
            identity = self._credentials.authenticate(_token_of(handler_call_details.invocation_metadata))
        except PermissionError as err:
            log.warning("refused a call: %s", err)
            return _UNAUTHENTICATED
        refused = self._admission.enter(identity)
        if refused is not None:
            return _refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        return grpc.stream_unary_rpc_method_handler(functools.partial(self._exchange, identity=identity))

    def _exchange(self, requests: Iterator[bytes], context: grpc.ServicerContext, identity: str) -> bytes:
        try:
            request = next(requests, None)
            if request is None:  # the client went away (or sent no message) before the body arrived
                context.abort(grpc.StatusCode.CANCELLED, "no request message")
            return self._handler(request, identity)
        finally:
            self._admission.leave(identity)


def serve_link(
    handler: Callable[[bytes, str], bytes],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    credentials: Credentials | None = None,
    tls: TlsServerConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    max_workers: int = 8,
    max_concurrent_rpcs: int = 64,
    max_calls_per_identity: int = 8,
    keepalive_s: float = 60.0,
    max_connection_idle_s: float = 900.0,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server whose single method passes request bytes to ``handler``.

    Args:
        handler: ``handler(request, identity) -> reply`` maps request frame bytes to reply frame bytes;
            ``identity`` is who the call's token names (``""`` for open or shared-token credentials). It
            must not raise for bad input (it should reply with an error frame); an exception becomes an
            INTERNAL status for that call only.
        host, port: where to listen; ``port=0`` picks a free port.
        credentials: who may call (None: anyone). A call whose token they refuse gets UNAUTHENTICATED
            before its request message is read (see :class:`_Authenticator`).
        tls: serve over TLS (mutual TLS when it names a client CA); None serves plain text.
        max_message_bytes: larger requests are refused (RESOURCE_EXHAUSTED) before they are decoded.
        max_reply_bytes: the largest reply gRPC will send (the handler should refuse larger ones itself, with
            an error frame that says why).
        max_workers: worker threads running calls.
        max_concurrent_rpcs: accepted calls in the server at once (running or waiting for a worker); more
            are refused with RESOURCE_EXHAUSTED before their body is read. Calls refused for their token
            never count.
        max_calls_per_identity: the same bound for the calls of one identity, so that one device cannot
            take every place (not applied to ``""``, the one identity of open or shared-token servers).
        keepalive_s: the server pings connections this often and allows client pings no more often.
        max_connection_idle_s: connections without a call for this long are closed.

    Returns:
        The started server and the port it is bound to.
    """
    credentials = credentials if credentials is not None else Credentials.open()
    authenticator = _Authenticator(credentials, _Admission(max_concurrent_rpcs, max_calls_per_identity), handler)
    # the service is registered for gRPC's method lookup; every call of it gets the authenticator's handler
    unreached = grpc.unary_unary_rpc_method_handler(lambda request, context: context.abort(
        grpc.StatusCode.UNAUTHENTICATED, "call was not authenticated"))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mobillm-link"),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, {"Exchange": unreached})],
        interceptors=[authenticator],
        options=_server_options(max_message_bytes, max_reply_bytes, keepalive_s, max_connection_idle_s),
    )
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as err:  # grpcio raises when the port cannot be bound
        raise LinkError(f"could not listen on {address}: {err}") from None
    if bound == 0:
        raise LinkError(f"could not listen on {address}")
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

    def limit_calls(self, timeout: float) -> None:  # noqa: B027 - a link without deadlines has nothing to do
        """From now on a call waits at most ``timeout`` seconds and is not retried (a link being closed)."""

    def close(self) -> None:
        self._sender.shutdown(wait=True, cancel_futures=True)


class InProcessLink(Link):
    """A link to a server handler living in this process; no network, same frames.

    Args:
        handler: the server's entry point, ``handler(request, identity) -> reply`` (e.g.
            ``FrameServer.handle``), which never raises for bad input.
        identity: the identity every call presents, as a tokens file would name it (``""``: none).
        max_message_bytes: requests larger than this are refused, as the gRPC link refuses them.
        max_reply_bytes: replies larger than this are refused, likewise.
    """

    def __init__(self, handler: Callable[[bytes, str], bytes], *, identity: str = "",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES, address: str = "inprocess") -> None:
        super().__init__()
        self.address = address
        self._handler = handler
        self._identity = identity
        self._max = max_message_bytes
        self._max_reply = max_reply_bytes

    def _exchange_bytes(self, request: bytes) -> bytes:
        if len(request) > self._max:
            raise LinkError(f"call to {self.address} failed: RESOURCE_EXHAUSTED: request of {len(request)} bytes "
                            f"exceeds {self._max}")
        # bytes(...) so the handler never holds a view of the caller's buffer, as with a real network
        reply = bytes(self._handler(bytes(request), self._identity))
        if len(reply) > self._max_reply:
            raise LinkError(f"call to {self.address} failed: RESOURCE_EXHAUSTED: reply of {len(reply)} bytes "
                            f"exceeds {self._max_reply}")
        return reply


class GrpcLink(Link):
    """The gRPC link (see the module docstring); waits up to ``connect_timeout`` for the server.

    Args:
        address: ``host:port`` of the server.
        token: the device's token, sent with every call (None: none).
        tls: connect over TLS with these settings (None: plain text).
        connect_timeout: how long to wait for the server to accept a connection.
        call_timeout: the deadline of each call.
        retries: how many times a call that failed with UNAVAILABLE is retried.
        max_message_bytes: the largest request.
        max_reply_bytes: the largest reply.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        tls: TlsClientConfig | None = None,
        connect_timeout: float = 30.0,
        call_timeout: float = 600.0,
        retries: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        super().__init__()
        self.address = address
        self._metadata = ((TOKEN_KEY, token),) if token else ()
        self._call_timeout = call_timeout
        self._retries = retries
        self._tls = tls
        options = _channel_options(max_message_bytes, max_reply_bytes)
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, tls.credentials(), options=options + tls.channel_options())
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
                    hint = " (over TLS: is its certificate trusted, and for this name?)" if self._tls else ""
                    raise LinkError(
                        f"server at {self.address} is unreachable (tried for {timeout:.0f} s, {attempt} attempts){hint}"
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
                raise LinkError(f"call to {self.address} failed: {code.name}: {err.details()}", code=code.name) from None
        raise AssertionError("unreachable")

    def limit_calls(self, timeout: float) -> None:
        self._call_timeout = min(self._call_timeout, timeout)
        self._retries = 0

    def close(self) -> None:
        self._channel.close()  # ends a call in flight at once, so the sender thread is free to stop
        super().close()
