"""Who may call a server and over what: per-device tokens (revocable while serving), refusal before the
request is read, TLS and mutual TLS, the server's refusal to serve a network in the clear, the ``token``
subcommand, and bounded logs.

Real gRPC over loopback with tiny handlers; every call has a deadline, and nothing waits on wall time.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import threading
from pathlib import Path

import grpc
import pytest

from lightning_mobillm import cli
from lightning_mobillm.client import start_serve, stop_process
from lightning_mobillm.server.app import InsecureServerError, check_exposure, is_loopback
from lightning_mobillm.server.logs import LogLimiter, install_log_limits
from lightning_mobillm.server_config import ServerConfig
from lightning_mobillm.transport.link import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FRAME_SLACK_BYTES,
    METHOD,
    TOKEN_KEY,
    GrpcLink,
    InProcessLink,
    LinkError,
    serve_link,
)
from lightning_mobillm.transport.security import (
    Credentials,
    TlsClientConfig,
    TlsServerConfig,
    hash_token,
    new_token,
    parse_tokens,
)

DEADLINE = 10.0  # seconds; an upper bound on calls expected to finish at once, never waited out


def echo(data: bytes, identity: str) -> bytes:
    return identity.encode() + b":" + data


class Recorder:
    """A handler that records what reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def __call__(self, data: bytes, identity: str) -> bytes:
        with self._lock:
            self.calls.append((len(data), identity))
        return echo(data[:16], identity)


@pytest.fixture
def served():
    """``served(handler, **serve_link_kwargs) -> port``; every server is stopped at the end."""
    servers = []

    def start(handler, **kwargs) -> int:
        server, port = serve_link(handler, host="127.0.0.1", port=0, **kwargs)
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0)


def link(port: int, token: str | None = None, **kwargs) -> GrpcLink:
    kwargs.setdefault("connect_timeout", DEADLINE)
    return GrpcLink(f"127.0.0.1:{port}", token, call_timeout=DEADLINE, retries=0, **kwargs)


def raw_call(channel: grpc.Channel, data: bytes, token: str | None = None) -> grpc.RpcError | bytes:
    """One call on a raw channel: the reply, or the error (fails fast: no wait_for_ready)."""
    metadata = ((TOKEN_KEY, token),) if token else None
    try:
        return channel.unary_unary(METHOD)(data, metadata=metadata, timeout=DEADLINE)
    except grpc.RpcError as err:
        return err


def write_tokens(path: Path, tokens: dict[str, str]) -> None:
    path.write_text("# identity sha256\n\n" + "".join(f"{who} {hash_token(t)}\n" for who, t in tokens.items()))


# -- credentials ---------------------------------------------------------------------------------------


def test_default_message_limit_follows_the_server_config():
    assert DEFAULT_MAX_MESSAGE_BYTES == ServerConfig().max_frame_bytes + FRAME_SLACK_BYTES


def test_tokens_file_parses_and_names_bad_lines():
    good = f"# comment\n\nphone-1 {hash_token('a')}\n  laptop@home {hash_token('b').upper()}  \n"
    assert parse_tokens(good) == {"phone-1": hash_token("a"), "laptop@home": hash_token("b")}
    h = hash_token("x")
    for text, named in [
        (f"ok {h}\nbad\n", "line 2"),
        (f"a b {h}\n", "line 1"),
        (f"bad/name {h}\n", "identity"),
        (f"{'x' * 65} {h}\n", "identity"),
        ("dev 1234\n", "64 hex"),
        (f"dev {h}\ndev {hash_token('y')}\n", "twice"),
        (f"a {h}\nb {h}\n", "same token hash"),
    ]:
        with pytest.raises(ValueError, match=named):
            parse_tokens(text)


def test_credential_modes(tmp_path, monkeypatch):
    assert Credentials.open().authenticate(None) == "" and Credentials.open().mode == "open"
    shared = Credentials.shared("s3cret")
    assert shared.mode == "shared" and shared.authenticate("s3cret") == ""
    for bad in (None, "", "s3cre", "s3cret "):
        with pytest.raises(PermissionError):
            shared.authenticate(bad)
    with pytest.raises(ValueError):
        Credentials.shared("")
    path = tmp_path / "tokens"
    write_tokens(path, {"phone-1": "t1", "phone-2": "t2"})
    per_device = Credentials.from_tokens_file(path)
    assert per_device.mode == "tokens_file"
    assert per_device.authenticate("t1") == "phone-1" and per_device.authenticate("t2") == "phone-2"
    for bad in (None, "", "t3", hash_token("t1")):
        with pytest.raises(PermissionError):
            per_device.authenticate(bad)
    assert "t1" not in per_device.describe() and hash_token("t1") not in per_device.describe()
    with pytest.raises(FileNotFoundError, match="tokens_file"):
        Credentials.from_tokens_file(tmp_path / "missing")
    # from a server config: the tokens file wins over a shared token, which wins over none
    monkeypatch.setenv("MOBILLM_TOKEN", "shared-one")
    assert Credentials.from_config(ServerConfig(tokens_file=str(path))).mode == "tokens_file"
    assert Credentials.from_config(ServerConfig()).authenticate("shared-one") == ""
    (tmp_path / "shared").write_text("from-file\n")
    assert Credentials.from_config(ServerConfig(token_file=str(tmp_path / "shared"))).authenticate("from-file") == ""
    monkeypatch.delenv("MOBILLM_TOKEN")
    assert Credentials.from_config(ServerConfig()).mode == "open"


def test_per_device_tokens_over_grpc_with_revocation(tmp_path, served):
    path = tmp_path / "tokens"
    write_tokens(path, {"phone-1": "t1", "phone-2": "t2"})
    handler = Recorder()
    port = served(handler, credentials=Credentials.from_tokens_file(path))
    one, two, wrong, anonymous = link(port, "t1"), link(port, "t2"), link(port, "t3"), link(port)
    try:
        assert one.call(b"x") == b"phone-1:x"
        assert two.call(b"y") == b"phone-2:y"
        for refused in (wrong, anonymous):
            with pytest.raises(LinkError, match="UNAUTHENTICATED"):
                refused.call(b"z")
        assert handler.calls == [(1, "phone-1"), (1, "phone-2")]  # refused calls never reached it

        # revoke phone-1 by deleting its line: the next call is refused, without a restart
        write_tokens(path, {"phone-2": "t2"})
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            one.call(b"x")
        assert two.call(b"y") == b"phone-2:y"

        # a new token for phone-2, same file size; the mtime is set so the change is visible whatever the
        # file system's timestamp granularity
        before = path.stat()
        write_tokens(path, {"phone-2": "T2"})
        assert path.stat().st_size == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            two.call(b"y")
        two.close()
        two = link(port, "T2")
        assert two.call(b"y") == b"phone-2:y"

        # a file that no longer parses keeps the last good table
        path.write_text("phone-2 not-a-hash\n")
        assert two.call(b"y") == b"phone-2:y"
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            one.call(b"x")
        # a file that is gone refuses everyone
        path.unlink()
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            two.call(b"y")
    finally:
        for each in (one, two, wrong, anonymous):
            each.close()


def test_shared_token_names_nobody(served):
    port = served(echo, credentials=Credentials.shared("s3cret"))
    good, bad = link(port, "s3cret"), link(port, "wrong")
    try:
        assert good.call(b"abc") == b":abc"
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            bad.call(b"abc")
    finally:
        good.close()
        bad.close()


def test_in_process_link_presents_its_identity():
    handler = Recorder()
    with_identity = InProcessLink(handler, identity="phone-1", max_message_bytes=100)
    assert with_identity.call(b"abc") == b"phone-1:abc"
    assert InProcessLink(handler).call(b"d") == b":d"
    with pytest.raises(LinkError, match="RESOURCE_EXHAUSTED"):
        with_identity.call(b"x" * 101)
    assert handler.calls == [(3, "phone-1"), (1, "")]


# -- refusal before the request is read -----------------------------------------------------------------


def test_refused_before_the_body_is_read(served):
    """A request over the size limit without a token is refused as UNAUTHENTICATED, not RESOURCE_EXHAUSTED:
    the refusal comes before gRPC has read (and size-checked) the message. With the token, the same
    request is refused for its size, and neither reaches the handler."""
    limit = 2**20
    handler = Recorder()
    port = served(handler, credentials=Credentials.shared("s3cret"), max_message_bytes=limit)
    big = b"\0" * (4 * limit)
    with grpc.insecure_channel(f"127.0.0.1:{port}",
                               options=[("grpc.max_send_message_length", 8 * limit)]) as channel:
        for _ in range(5):
            err = raw_call(channel, big)
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            err = raw_call(channel, big, token="wrong")
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        err = raw_call(channel, big, token="s3cret")
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert raw_call(channel, b"small", token="s3cret") == b":small"
    assert handler.calls == [(5, "")]


def test_stalled_unauthenticated_calls_hold_no_worker(served):
    """64 calls without a token whose request never arrives (headers sent, then the body stalls) are
    refused at once, while their bodies are still stalled; an authenticated call then completes on a
    server with 4 workers. (Were the token checked in a unary handler, each stalled call would hold a
    worker until its body arrived, and the authenticated call would wait behind them.)"""
    port = served(echo, credentials=Credentials.shared("s3cret"), max_workers=4)
    release = threading.Event()

    def stalled_body():
        release.wait(timeout=60)  # bounded: released at the end of the test
        yield b"late"

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stalled = [channel.stream_unary(METHOD).future(stalled_body(), timeout=DEADLINE) for _ in range(64)]
        codes = [call.exception(timeout=DEADLINE).code() for call in stalled]
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
        assert not release.is_set()  # every refusal came while the bodies were still stalled
        good = link(port, "s3cret")
        try:
            assert good.call(b"on time") == b":on time"
        finally:
            good.close()
    finally:
        release.set()
        channel.close()


def test_too_many_concurrent_calls_are_refused(served):
    """``max_concurrent_rpcs``: a call beyond the limit is refused with RESOURCE_EXHAUSTED."""
    entered, release = threading.Event(), threading.Event()

    def blocking(data: bytes, identity: str) -> bytes:
        entered.set()
        release.wait(timeout=60)
        return data

    port = served(blocking, max_concurrent_rpcs=1)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        first = channel.unary_unary(METHOD).future(b"first", timeout=DEADLINE)
        try:
            assert entered.wait(timeout=DEADLINE)
            err = raw_call(channel, b"second")
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            release.set()
        assert first.result(timeout=DEADLINE) == b"first"


def test_one_identity_cannot_take_every_place(served, tmp_path):
    """``max_calls_per_identity``: while alice has a call in progress (her limit is 1 here), her next call
    is refused with RESOURCE_EXHAUSTED before its body is read; bob's call goes through, and alice's
    place comes back when her call ends. Calls refused for their token never take a place."""
    tokens = tmp_path / "tokens"
    write_tokens(tokens, {"alice": "a-token", "bob": "b-token"})
    entered, release = threading.Event(), threading.Event()
    handler = Recorder()

    def blocking(data: bytes, identity: str) -> bytes:
        if data == b"hold":
            entered.set()
            release.wait(timeout=60)
        return handler(data, identity)

    port = served(blocking, credentials=Credentials.from_tokens_file(tokens), max_concurrent_rpcs=3,
                  max_calls_per_identity=1)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        held = channel.unary_unary(METHOD).future(b"hold", metadata=((TOKEN_KEY, "a-token"),), timeout=DEADLINE)
        try:
            assert entered.wait(timeout=DEADLINE)
            err = raw_call(channel, b"second", token="a-token")
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_calls_per_identity" in err.details()
            for _ in range(8):  # more than max_concurrent_rpcs, none of them counted
                err = raw_call(channel, b"x", token="wrong")
                assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert raw_call(channel, b"from bob", token="b-token") == b"bob:from bob"
        finally:
            release.set()
        assert held.result(timeout=DEADLINE) == b"alice:hold"
        assert raw_call(channel, b"again", token="a-token") == b"alice:again"
    assert [who for _, who in handler.calls] == ["bob", "alice", "alice"]


# -- TLS -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, str]:
    """Throw-away PEM files: a CA, a server certificate for localhost/127.0.0.1, a client certificate,
    and a second CA that signed nothing of these."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, str] = {}

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(stem: str, key, cert) -> None:
        (folder / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{stem}_key"], files[f"{stem}_cert"] = str(folder / f"{stem}.key"), str(folder / f"{stem}.pem")

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, extensions=()):
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    cas = {}
    for stem in ("ca", "other_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cas[stem] = key
        write(stem, key, certificate(f"test {stem}", key, f"test {stem}", key, ca=True))
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", server_key, certificate("localhost", server_key, "test ca", cas["ca"], ca=False, extensions=[
        x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
    ]))
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", client_key, certificate("phone-1", client_key, "test ca", cas["ca"], ca=False, extensions=[
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
    ]))
    return files


def tls_channel(port: int, client: TlsClientConfig, host: str = "localhost") -> grpc.Channel:
    return grpc.secure_channel(f"{host}:{port}", client.credentials(), options=client.channel_options())


def test_tls(pki, served):
    port = served(echo, credentials=Credentials.shared("s3cret"),
                  tls=TlsServerConfig(cert_file=pki["server_cert"], key_file=pki["server_key"]))
    trusting = TlsClientConfig(ca_file=pki["ca_cert"])
    for address, client in [("localhost", trusting), ("127.0.0.1", trusting),
                            ("127.0.0.1", TlsClientConfig(ca_file=pki["ca_cert"], server_name="localhost"))]:
        device = GrpcLink(f"{address}:{port}", "s3cret", tls=client, connect_timeout=DEADLINE,
                          call_timeout=DEADLINE, retries=0)
        try:
            assert device.call(b"over tls") == b":over tls"
        finally:
            device.close()
    with tls_channel(port, trusting) as channel:  # TLS does not replace the token
        assert raw_call(channel, b"x").code() == grpc.StatusCode.UNAUTHENTICATED
    # a plain-text client, and a TLS client that trusts another CA, cannot talk to it
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        err = raw_call(channel, b"x", token="s3cret")
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err
    with tls_channel(port, TlsClientConfig(ca_file=pki["other_ca_cert"])) as channel:
        err = raw_call(channel, b"x", token="s3cret")
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err


def test_mutual_tls(pki, served):
    port = served(echo, tls=TlsServerConfig(cert_file=pki["server_cert"], key_file=pki["server_key"],
                                            client_ca_file=pki["ca_cert"]))
    with_cert = TlsClientConfig(ca_file=pki["ca_cert"], cert_file=pki["client_cert"], key_file=pki["client_key"])
    device = GrpcLink(f"localhost:{port}", tls=with_cert, connect_timeout=DEADLINE, call_timeout=DEADLINE,
                      retries=0)
    try:
        assert device.call(b"mutual") == b":mutual"
    finally:
        device.close()
    for without in (TlsClientConfig(ca_file=pki["ca_cert"]),
                    # a certificate the server's client CA did not sign
                    TlsClientConfig(ca_file=pki["ca_cert"], cert_file=pki["other_ca_cert"],
                                    key_file=pki["other_ca_key"])):
        with tls_channel(port, without) as channel:
            err = raw_call(channel, b"x")
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err


def test_tls_settings_are_checked(pki, tmp_path):
    assert TlsServerConfig.from_config(ServerConfig()) is None
    tls = TlsServerConfig.from_config(ServerConfig(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"]))
    assert tls is not None and not tls.mutual
    with pytest.raises(ValueError, match="tls_key_file"):
        TlsServerConfig.from_config(ServerConfig(tls_cert_file=pki["server_cert"]))
    with pytest.raises(ValueError, match="tls_cert_file"):
        TlsServerConfig.from_config(ServerConfig(tls_key_file=pki["server_key"]))
    with pytest.raises(ValueError, match="tls_client_ca_file"):
        TlsServerConfig.from_config(ServerConfig(tls_client_ca_file=pki["ca_cert"]))
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(FileNotFoundError, match=f"tls_key_file: {missing}"):
        TlsServerConfig(cert_file=pki["server_cert"], key_file=missing).credentials()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="tls_ca_file: .*junk.pem is not a PEM file"):
        TlsClientConfig(ca_file=str(tmp_path / "junk.pem")).credentials()
    with pytest.raises(ValueError, match="tls_key_file"):
        TlsClientConfig(cert_file=pki["client_cert"])


# -- the server's refusal to serve a network in the clear -------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_may_serve_open(host):
    assert is_loopback(host)
    assert check_exposure(host, "open", tls=False, allow_insecure=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "server.example.org"])
@pytest.mark.parametrize(("mode", "tls", "missing"), [("open", True, "a token"), ("shared", False, "TLS"),
                                                      ("tokens_file", False, "TLS"), ("open", False, "TLS")])
def test_network_needs_tls_and_a_token(host, mode, tls, missing):
    assert not is_loopback(host)
    with pytest.raises(InsecureServerError, match="allow_insecure") as err:
        check_exposure(host, mode, tls=tls, allow_insecure=False)
    assert missing in str(err.value) and host in str(err.value)
    assert missing in check_exposure(host, mode, tls=tls, allow_insecure=True)  # then only a warning
    assert check_exposure(host, "tokens_file", tls=True, allow_insecure=False) is None
    assert check_exposure(host, "shared", tls=True, allow_insecure=False) is None


def test_serve_refuses_to_start_in_the_clear(monkeypatch):
    """``serve`` raises before it loads or binds anything (so 0.0.0.0 is never listened on)."""
    from lightning_mobillm.server import app

    monkeypatch.delenv("MOBILLM_TOKEN", raising=False)
    monkeypatch.setattr(app, "install_log_limits", lambda: None)  # leave this process's loggers alone
    monkeypatch.setattr(app, "make_handler", lambda *a, **k: pytest.fail("a server was built"))
    monkeypatch.setattr(app, "serve_link", lambda *a, **k: pytest.fail("a port was bound"))
    with pytest.raises(InsecureServerError, match="allow_insecure"):
        app.serve(ServerConfig(host="0.0.0.0", device="cpu"))
    with pytest.raises(app.ServerSetupError, match="tls_cert_file"):
        app.serve(ServerConfig(host="0.0.0.0", device="cpu", tls_cert_file="/nonexistent/cert.pem",
                               tls_key_file="/nonexistent/key.pem", allow_insecure=True))


def test_serve_with_tls_and_per_device_tokens(pki, tmp_path):
    """``python -m lightning_mobillm serve`` as a user would start it for remote devices (on loopback)."""
    tokens = tmp_path / "tokens"
    write_tokens(tokens, {"phone-1": "t1-secret-token"})
    env = {k: v for k, v in os.environ.items() if k != "MOBILLM_TOKEN"}
    log = tmp_path / "server.stderr"
    proc, ready = start_serve(
        ["--server.tokens_file", str(tokens), "--server.tls_cert_file", pki["server_cert"],
         "--server.tls_key_file", pki["server_key"], "--server.device", "cpu", "--server.threads", "1"],
        log_path=log, cwd=Path(__file__).parents[1], env=env)
    port = int(ready["port"])
    try:
        tls = TlsClientConfig(ca_file=pki["ca_cert"])
        device = GrpcLink(f"localhost:{port}", "t1-secret-token", tls=tls, connect_timeout=DEADLINE,
                          call_timeout=DEADLINE, retries=0)
        stranger = GrpcLink(f"localhost:{port}", "guess", tls=tls, connect_timeout=DEADLINE,
                            call_timeout=DEADLINE, retries=0)
        try:
            assert device.call(b"not a frame")  # reached the server's handler: an error frame back
            with pytest.raises(LinkError, match="UNAUTHENTICATED"):
                stranger.call(b"not a frame")
        finally:
            device.close()
            stranger.close()
    finally:
        stop_process(proc, 60)
    text = log.read_text()
    assert "per-device tokens" in text and "TLS: on" in text and "refused a call" in text
    assert "t1-secret-token" not in text and hash_token("t1-secret-token") not in text


def test_serve_takes_no_token_on_the_command_line(capsys):
    for argv in (["serve", "--server.token", "s3cret"], ["serve", "--server.token=s3cret"],
                 ["serve", "--server", '{"token": "s3cret"}']):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "token" in err and "--server.tokens_file" in err and "MOBILLM_TOKEN" in err, err
    # an abbreviation is never taken for a longer option
    with pytest.raises(SystemExit):
        cli.main(["serve", "--server.tokens", "file"])
    assert "unrecognized arguments: --server.tokens" in capsys.readouterr().err


# -- the token subcommand ---------------------------------------------------------------------------------


def test_token_subcommand_round_trip(tmp_path, capsys, served):
    path = tmp_path / "tokens"
    cli.main(["token", "--identity", "phone-1", "--file", str(path)])
    token = capsys.readouterr().out.strip()
    assert (path.stat().st_mode & 0o777) == 0o600
    assert token not in path.read_text() and hash_token(token) in path.read_text()
    cli.main(["token", "--identity", "phone-2", "--file", str(path)])
    other = capsys.readouterr().out.strip()
    assert other != token and len(token) >= 40

    credentials = Credentials.from_tokens_file(path)
    port = served(echo, credentials=credentials)
    device = link(port, token)
    try:
        assert device.call(b"hi") == b"phone-1:hi"
        with pytest.raises(SystemExit):  # one identity, one line
            cli.main(["token", "--identity", "phone-1", "--file", str(path)])
        assert "already in" in capsys.readouterr().err

        cli.main(["token", "--identity", "phone-1", "--file", str(path), "--revoke"])
        assert capsys.readouterr().out == ""
        with pytest.raises(LinkError, match="UNAUTHENTICATED"):
            device.call(b"hi")
        assert credentials.authenticate(other) == "phone-2"
        assert (path.stat().st_mode & 0o777) == 0o600
        with pytest.raises(SystemExit):
            cli.main(["token", "--identity", "phone-1", "--file", str(path), "--revoke"])
        assert "not in" in capsys.readouterr().err
    finally:
        device.close()
    with pytest.raises(SystemExit):
        cli.main(["token", "--identity", "bad name", "--file", str(path)])


def test_new_tokens_are_fresh():
    assert len({new_token() for _ in range(100)}) == 100


# -- bounded logs -----------------------------------------------------------------------------------------


def test_log_lines_are_truncated_and_rate_limited():
    now = [0.0]
    limiter = LogLimiter(max_chars=50, per_window=3, window_s=60.0, clock=lambda: now[0])
    logger = logging.getLogger("test_transport_security.limited")
    logger.propagate = False
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    install_log_limits(limiter, names=[logger.name])
    install_log_limits(limiter, names=[logger.name])  # idempotent: one limiter per logger
    assert len(logger.filters) == 1

    logger.info("device said %s", "x" * 500)
    assert lines[-1].startswith("device said xxx") and "chars truncated" in lines[-1] and len(lines[-1]) < 100
    for i in range(10):
        logger.warning("refused a call: %s", i)
    assert lines[1:] == ["refused a call: 0", "refused a call: 1", "refused a call: 2",
                         "further lines like 'refused a call: %s' suppressed for up to 60 s"]
    logger.warning("another template")  # templates are limited separately
    assert lines[-1] == "another template"
    now[0] = 59.0
    logger.warning("refused a call: %s", 10)
    assert len(lines) == 6
    now[0] = 60.0  # a new window: the first line says how many were suppressed
    logger.warning("refused a call: %s", 11)
    assert lines[-1] == "refused a call: 11 [8 similar lines suppressed]"
    logger.warning("refused a call: %s", 12)
    assert lines[-1] == "refused a call: 12"


def test_the_devices_strategy_settings_reach_the_link(pki, served, tmp_path):
    """The strategy's ``token_file`` and ``tls_*`` settings, as a recipe gives them, make a mutual-TLS call."""
    from lightning_mobillm.client import ServerClient, read_token
    from lightning_mobillm.strategies import ServerAssistedStrategy

    port = served(echo, credentials=Credentials.shared("s3cret"),
                  tls=TlsServerConfig(cert_file=pki["server_cert"], key_file=pki["server_key"],
                                      client_ca_file=pki["ca_cert"]))
    (tmp_path / "token").write_text("s3cret\n")
    strategy = ServerAssistedStrategy(server=f"localhost:{port}", token_file=str(tmp_path / "token"),
                                      tls_ca_file=pki["ca_cert"], tls_cert_file=pki["client_cert"],
                                      tls_key_file=pki["client_key"])
    assert strategy.token == read_token("UNSET_VARIABLE", str(tmp_path / "token")) == "s3cret"
    client = ServerClient(strategy.server_address, strategy.token, tls=strategy.tls, connect_timeout=DEADLINE,
                          call_timeout=DEADLINE, retries=0).open()
    try:
        assert client.call(b"device") == b":device"
    finally:
        client.close()
    plain = ServerClient(strategy.server_address, strategy.token, connect_timeout=2, call_timeout=DEADLINE,
                         retries=0)
    with pytest.raises(LinkError):
        plain.open().call(b"x")
    plain.close()
