"""TLS and mutual TLS of a role's APIs from PEM files (`server.tls`).

The files are usually a mounted Kubernetes Secret that cert-manager (or an
operator) rewrites before the certificate expires, so they are re-read when
they change: the gRPC server asks for the current certificates on each new
connection (`grpc.dynamic_ssl_server_credentials`), and the HTTP API builds
a new `ssl.SSLContext` for the next connection. Connections already open
keep the certificate they started with. A rewrite that cannot be read or
does not parse keeps the last good certificates (logged `tls_reload_failed`).
With `client_ca_file` the server requires a client certificate signed by
that CA (mutual TLS): a gRPC client without one is refused at the handshake;
an HTTPS client without one completes it, and the reward role's HTTP API
answers it 403 for everything but `GET /health` (Kubernetes' HTTPS probes).
A certificate the CA did not sign fails the handshake on both.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass

import grpc

from alignd.config import ConfigError, TLSConfig
from alignd.runtime.logging import get_logger
from alignd.runtime.watched import WatchedFiles

_log = get_logger("alignd.tls")


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes
    client_ca: bytes | None


class CertFiles:
    """The PEM files of a TLSConfig, re-read when one of them changes (alignd.runtime.watched)."""

    def __init__(self, cfg: TLSConfig) -> None:
        if not cfg.enabled:
            raise ValueError("TLS is not configured")
        self.cfg = cfg
        self._paths = {"cert_file": cfg.cert_file, "key_file": cfg.key_file, "client_ca_file": cfg.client_ca_file}
        try:
            self._files = WatchedFiles(
                {k: v for k, v in self._paths.items() if v is not None}, self._load, on_error=self._failed
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"server.tls: {exc}") from None

    @property
    def mutual(self) -> bool:
        return self.cfg.client_ca_file is not None

    @property
    def pem(self) -> Pem:
        """The certificates in force (the last good ones)."""
        return self._files.value

    def _load(self) -> Pem:
        def read(field: str) -> bytes | None:
            path = self._paths[field]
            if path is None:
                return None
            with open(path, "rb") as f:
                data = f.read()
            if b"-----BEGIN " not in data:
                raise ValueError(f"{field} {path}: not a PEM file")
            return data

        pem = Pem(read("cert_file"), read("key_file"), read("client_ca_file"))
        ssl_context(pem, mutual=pem.client_ca is not None)  # ValueError: a key that does not match, a bad CA bundle
        return pem

    @staticmethod
    def _failed(exc: Exception) -> None:
        _log.error("tls_reload_failed", error=str(exc))

    def refresh(self) -> bool:
        """Re-reads the files if they changed; True when new certificates were loaded."""
        if not self._files.refresh():
            return False
        _log.info("tls_certificates_reloaded")
        return True

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up rewritten files on the next connection."""

        def config(pem: Pem):
            return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.client_ca)

        served = [self.pem]  # what gRPC serves now; the HTTP side may have been the one to reload

        def fetch():
            self.refresh()
            pem = self.pem
            if pem is served[0]:
                return None
            served[0] = pem
            return config(pem)

        return grpc.dynamic_ssl_server_credentials(config(self.pem), fetch, require_client_authentication=self.mutual)


def ssl_context(pem: Pem, *, mutual: bool, optional_client_cert: bool = False) -> ssl.SSLContext:
    """A server-side SSLContext (TLS 1.2+) for the PEM data; ValueError when it does not load. With `mutual`,
    a client certificate must verify against the client CA; `optional_client_cert` lets a client without one
    finish the handshake (the caller then checks `getpeercert()` per request: the HTTP API's /health)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: hand it private temporary copies (removed at once), in memory where possible.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="alignd-tls-", dir=shm) as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert, pem.cert), (key, pem.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ValueError(f"certificate and key do not load together ({exc.reason or exc})") from None
    if mutual:
        try:
            ctx.load_verify_locations(cadata=pem.client_ca.decode("ascii", errors="replace"))
        except ssl.SSLError as exc:
            raise ValueError(f"client_ca_file does not load ({exc.reason or exc})") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL if optional_client_cert else ssl.CERT_REQUIRED
    return ctx


class HttpTLS:
    """The SSLContext of the HTTP API, rebuilt when the certificate files change.

    Under mutual TLS the handshake accepts a client without a certificate (a certificate that is presented
    must verify), so that Kubernetes' HTTPS probes reach GET /health; every other request of such a client
    is refused 403 by the HTTP API (`client_verified`)."""

    def __init__(self, files: CertFiles) -> None:
        self.files = files
        self._pem = files.pem
        self._ctx = self._make(files.pem)

    def _make(self, pem: Pem) -> ssl.SSLContext:
        return ssl_context(pem, mutual=self.files.mutual, optional_client_cert=True)

    def context(self) -> ssl.SSLContext:
        self.files.refresh()
        pem = self.files.pem  # also picks up a reload that the gRPC side triggered
        if pem is not self._pem:
            self._ctx, self._pem = self._make(pem), pem
        return self._ctx

    def client_verified(self, sock) -> bool:
        """Whether the connection presented a client certificate (verified at the handshake); True without mTLS."""
        return not self.files.mutual or bool(sock.getpeercert())
