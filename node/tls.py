"""DICOM TLS (PS3.15 B.1, BCP 195): the SSL contexts of the TLS listener and of TLS destinations,
and a listener whose TLS handshake runs in the connection's own thread.

pynetdicom (3.0) does the server-side handshake inside the accept loop, on a blocking socket: one
client that connects and sends nothing stalls every later connection to that port, and a refused
handshake vanishes without a word (socketserver drops the OSError). ``HandshakingServer`` moves the
handshake into the connection thread, bounds it with a timeout and logs who was refused and why;
the change is small enough to propose upstream.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from vesalius.inference.fields import FieldError, check_types
from vesalius.node.checks import ConfigError, existing_file

log = logging.getLogger("vesalius.tls")

HANDSHAKE_TIMEOUT = 30.0  # s a client has to complete the TLS handshake


@dataclass(frozen=True)
class ListenerTLS:
    """The TLS listener's identity and whom it trusts (``[tls]`` in the configuration)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None  # CAs that sign the clients' certificates
    require_client_certificate: bool = True  # mutual TLS: clients without a trusted certificate are refused

    def __post_init__(self) -> None:
        check_types(self)
        if self.require_client_certificate and self.ca_certificates is None:
            raise FieldError("ca_certificates: required with require_client_certificate = true "
                             "(the CAs whose client certificates are trusted)")
        for name in ("certificate", "private_key", "ca_certificates"):
            existing_file(name, getattr(self, name))


@dataclass(frozen=True)
class ClientTLS:
    """TLS towards a destination: whom we trust, and our own certificate for mutual TLS."""

    ca_certificates: Path | None = None  # None: the system's trust store
    certificate: Path | None = None
    private_key: Path | None = None
    verify_hostname: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("ca_certificates", "certificate", "private_key"):
            existing_file(name, getattr(self, name))
        if (self.certificate is None) != (self.private_key is None):
            raise FieldError("certificate: mutual TLS needs both tls_certificate and tls_private_key")


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path | None, what: str) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"{what}: cannot load {certificate} with its private key: {err}") from err


def _load_cas(context: ssl.SSLContext, ca_certificates: Path, what: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"{what}: cannot load CA certificates {ca_certificates}: {err}") from err


def server_context(settings: ListenerTLS) -> ssl.SSLContext:
    """The listener's context: TLS 1.2 or later, our certificate, the clients' CAs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, settings.certificate, settings.private_key, "tls.certificate")
    if settings.ca_certificates is not None:
        _load_cas(context, settings.ca_certificates, "tls.ca_certificates")
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(settings: ClientTLS, what: str = "tls") -> ssl.SSLContext:
    """A destination's context: the server's certificate checked against the CAs (and its name
    against the host, unless ``verify_hostname`` is off); our certificate when one is given."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.ca_certificates is not None:
        _load_cas(context, settings.ca_certificates, f"{what}_ca_certificates")
    context.check_hostname = settings.verify_hostname
    if settings.certificate is not None:
        _load_chain(context, settings.certificate, settings.private_key, f"{what}_certificate")
    return context


def _printable(value: object, limit: int = 64) -> str:
    """A value from a peer's certificate, safe to log."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text[:limit]


def peer_subject(sock: ssl.SSLSocket) -> str:
    """The verified client certificate's common name ("" without a certificate)."""
    certificate: Any = sock.getpeercert() or {}
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return _printable(value)
    return ""


def _handshake_failure(err: Exception) -> str:
    """Why a handshake failed, in OpenSSL's words (fixed strings, nothing the peer chose)."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({err.verify_message})"
    if isinstance(err, ssl.SSLError):
        return str(err.reason or type(err).__name__)
    if isinstance(err, TimeoutError | socket.timeout):
        return f"no handshake within {HANDSHAKE_TIMEOUT:.0f} s"
    return type(err).__name__


class HandshakingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake in the connection thread (see above)."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None and self.ssl_context is not None
        client, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        where = f"{client_address[0]}:{client_address[1]}"
        try:
            request.settimeout(HANDSHAKE_TIMEOUT)
            request.do_handshake()
            request.settimeout(None)
        except (ssl.SSLError, OSError) as err:
            log.warning("TLS connection from %s refused: %s", where, _handshake_failure(err))
            request.close()
            return
        subject = peer_subject(request)
        log.info("TLS connection from %s%s", where, f" certificate CN={subject!r}" if subject else
                 " without a client certificate")
        super().finish_request(request, client_address)


def start_tls_server(ae: AE, address: tuple[str, int], context: ssl.SSLContext,
                     handlers: Sequence[Any]) -> ThreadedAssociationServer:
    """Like ``ae.start_server(address, block=False, ssl_context=context)``, with our server class."""
    server = ae.make_server(address, evt_handlers=list(handlers), ssl_context=context,
                            server_class=HandshakingServer)
    threading.Thread(target=server.serve_forever, name=f"TLSAcceptor@{address[1]}", daemon=True).start()
    ae._servers.append(server)  # as start_server does: AE.shutdown() and server.shutdown() expect it
    return server
