"""Who may call a server, and over what: device credentials and TLS settings of the gRPC link.

* :class:`Credentials` decides who may call. Three modes (:attr:`Credentials.mode`):

  - ``tokens_file``: per-device tokens. A file holds one ``<identity> <sha256 hex of the token>`` line
    per device (``#`` comments and blank lines ignored); ``python -m lightning_mobillm token`` makes
    entries. A call's token names its identity. The file is re-read when it changes (its size, mtime,
    ctime or inode), so deleting a line revokes that device on its next call, without a restart. A file
    that no longer parses keeps the last good table (and logs an error); a file that is gone refuses
    everyone until it is back.
  - ``shared``: one token that every device holds. The transport then names nobody (identity ``""``),
    and the server trusts the ``device_id`` a hello claims: an explicit, weaker choice (any holder can
    claim to be any device), kept for a single user's devices and the embedded loopback server.
  - ``open``: anyone may call (identity ``""``); for a loopback server only.

  Only sha256 digests of tokens are kept and compared, in constant time (:func:`hmac.compare_digest`), and
  every entry of a tokens file is compared, so the time a refusal takes says nothing about which entry came
  close.
* :class:`TlsServerConfig` / :class:`TlsClientConfig`: PEM files for TLS and mutual TLS on the link.

Nothing here knows about frames, Lightning or the methods; :mod:`lightning_mobillm.transport.link` uses
it, and the server builds both from its :class:`~lightning_mobillm.server_config.ServerConfig`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import grpc

if TYPE_CHECKING:  # only for annotations: the transport does not import the server's settings module
    from lightning_mobillm.server_config import ServerConfig

log = logging.getLogger(__name__)

#: A device identity: 1 to 64 characters of letters, digits and ``_ . @ -``.
IDENTITY_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")

Mode = Literal["tokens_file", "shared", "open"]


def hash_token(token: str) -> str:
    """The sha256 hex digest of a token: what a tokens file stores instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def parse_tokens(text: str, *, source: str = "tokens file") -> dict[str, str]:
    """Parse a tokens file's text into ``{identity: sha256 hex}`` (lower case).

    Raises:
        ValueError: naming ``source`` and the line number of a malformed line, a bad identity, a digest
            that is not 64 hex digits, a repeated identity or a digest shared by two identities.
    """
    table: dict[str, str] = {}
    owners: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}, line {number}: expected '<identity> <sha256 hex>', got {len(parts)} fields")
        identity, digest = parts
        if not IDENTITY_RE.fullmatch(identity):
            raise ValueError(f"{source}, line {number}: identity must be 1-64 characters of [A-Za-z0-9_.@-]")
        if not _HEX_RE.fullmatch(digest):
            raise ValueError(f"{source}, line {number}: the token's sha256 must be 64 hex digits")
        digest = digest.lower()
        if identity in table:
            raise ValueError(f"{source}, line {number}: identity {identity!r} appears twice")
        if digest in owners:
            raise ValueError(f"{source}, line {number}: the same token hash as {owners[digest]!r}")
        table[identity] = digest
        owners[digest] = identity
    return table


class Credentials:
    """Who may call: :meth:`open`, :meth:`shared` or :meth:`from_tokens_file` (see the module docstring).

    :meth:`authenticate` is called for every call, before its request is read, so it is cheap: one
    ``stat`` of the tokens file, and a re-read only when the file changed. Thread-safe.
    """

    def __init__(self, mode: Mode, *, digest: bytes | None = None, path: str | os.PathLike | None = None) -> None:
        """Use the constructors below."""
        self._mode: Mode = mode
        self._digest = digest
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._table: list[tuple[str, bytes]] = []
        self._signature: tuple[int, int, int, int] | None = None

    @classmethod
    def open(cls) -> Credentials:
        """Anyone may call; the identity is ``""``."""
        return cls("open")

    @classmethod
    def shared(cls, token: str) -> Credentials:
        """One token shared by every device; the identity is ``""`` (the server trusts the hello's
        ``device_id``)."""
        if not token:
            raise ValueError("a shared token must not be empty")
        return cls("shared", digest=hashlib.sha256(token.encode()).digest())

    @classmethod
    def from_tokens_file(cls, path: str | os.PathLike) -> Credentials:
        """Per-device tokens from ``path`` (``<identity> <sha256 hex>`` lines), re-read when it changes.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if it does not parse (naming the line).
        """
        creds = cls("tokens_file", path=path)
        if not creds._path.is_file():
            raise FileNotFoundError(f"tokens_file {creds._path} does not exist")
        creds._reload(strict=True)
        return creds

    @classmethod
    def from_config(cls, config: ServerConfig) -> Credentials:
        """The server's credentials: its ``tokens_file`` if set, else its shared token (``token_file`` or
        the ``token_env`` variable), else open."""
        if config.tokens_file:
            return cls.from_tokens_file(config.tokens_file)
        token = config.resolved_token()
        return cls.shared(token) if token else cls.open()

    @property
    def mode(self) -> Mode:
        """``tokens_file``, ``shared`` or ``open``."""
        return self._mode

    def describe(self) -> str:
        """One line for the server's log (never a token or a digest)."""
        if self._mode == "tokens_file":
            with self._lock:
                n = len(self._table)
            return f"per-device tokens from {self._path} ({n} identities)"
        if self._mode == "shared":
            return "one shared token (devices name themselves)"
        return "open (no token required)"

    def authenticate(self, token: str | None) -> str:
        """The identity that ``token`` names: a non-empty name in ``tokens_file`` mode, ``""`` otherwise.

        Raises:
            PermissionError: the token is missing or unknown (or revoked).
        """
        if self._mode == "open":
            return ""
        if not token:
            raise PermissionError("missing device token")
        given = hashlib.sha256(token.encode()).digest()
        if self._mode == "shared":
            if hmac.compare_digest(given, self._digest):
                return ""
            raise PermissionError("wrong device token")
        with self._lock:
            self._maybe_reload()
            table = self._table
        found = ""
        for identity, digest in table:  # every entry, no early exit
            if hmac.compare_digest(given, digest):
                found = identity
        if not found:
            raise PermissionError("unknown or revoked device token")
        return found

    # -- the tokens file ---------------------------------------------------------------------------------

    def _stat_signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_ino)

    def _maybe_reload(self) -> None:
        """Re-read the file if it changed since the last read (called under the lock)."""
        if self._stat_signature() != self._signature:
            self._reload(strict=False)

    def _reload(self, *, strict: bool) -> None:
        signature = self._stat_signature()
        try:
            text = self._path.read_text()
            table = parse_tokens(text, source=f"tokens_file {self._path}")
        except FileNotFoundError:
            if strict:
                raise
            self._signature = None
            if self._table:
                log.error("tokens_file %s is gone: refusing every device until it is back", self._path)
            self._table = []
            return
        except (OSError, ValueError, UnicodeDecodeError) as err:
            if strict:
                raise
            # a half-written or broken file: keep the last good table; re-read once the file changes again
            self._signature = signature
            log.error("%s; keeping the previous %d identities", err, len(self._table))
            return
        self._signature = signature
        old = {identity for identity, _ in self._table}
        self._table = [(identity, bytes.fromhex(digest)) for identity, digest in table.items()]
        if not strict:
            new = set(table)
            log.info("tokens_file %s re-read: %d identities (%d added, %d removed)", self._path, len(new),
                     len(new - old), len(old - new))


def _read_pem(key: str, path: str | os.PathLike) -> bytes:
    """The bytes of a PEM file, or an error naming the setting and the path."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: {p} does not exist")
    data = p.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{key}: {p} is not a PEM file")
    return data


@dataclass
class TlsServerConfig:
    """The server's TLS files (PEM): its certificate chain and key, and, for mutual TLS, the CA that signs
    the devices' client certificates (then a device without such a certificate cannot connect)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    @classmethod
    def from_config(cls, config: ServerConfig) -> TlsServerConfig | None:
        """From ``tls_cert_file``, ``tls_key_file`` and ``tls_client_ca_file``; None when TLS is off.

        Raises:
            ValueError: only one of the certificate and the key is set, or a client CA without them.
        """
        cert, key, ca = config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file
        if not cert and not key:
            if ca:
                raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file (the server's own TLS)")
            return None
        if not (cert and key):
            missing = "tls_key_file" if cert else "tls_cert_file"
            raise ValueError(f"TLS needs both tls_cert_file and tls_key_file; {missing} is not set")
        return cls(cert_file=cert, key_file=key, client_ca_file=ca or None)

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials (files read now; errors name the setting and the path)."""
        cert = _read_pem("tls_cert_file", self.cert_file)
        key = _read_pem("tls_key_file", self.key_file)
        ca = _read_pem("tls_client_ca_file", self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=self.client_ca_file is not None)


@dataclass
class TlsClientConfig:
    """A device's TLS settings: the CA that signs the server's certificate (None: the system's roots), a
    client certificate and key for mutual TLS, and the name to expect in the server's certificate when
    it differs from the host dialled (e.g. dialling an IP address)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            missing = "tls_key_file" if self.cert_file else "tls_cert_file"
            raise ValueError(f"a client certificate needs both tls_cert_file and tls_key_file; {missing} is not set")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials (files read now; errors name the setting and the path)."""
        ca = _read_pem("tls_ca_file", self.ca_file) if self.ca_file else None
        cert = _read_pem("tls_cert_file", self.cert_file) if self.cert_file else None
        key = _read_pem("tls_key_file", self.key_file) if self.key_file else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
