"""Client channels to LOOPS servers: :class:`ChannelSecurity` and :func:`open_channel`.

Clients (``ClientConfig``, the CLI, backends) open channels with :func:`open_channel` and a
:class:`ChannelSecurity`: a CA to verify the server (or ``tls=True`` for the system roots), an
optional client certificate, and a token sent as ``authorization: Bearer <token>`` metadata.
A token is never sent in plaintext to a non-loopback address unless ``insecure=True``.
The address helpers live here because both clients and servers (:mod:`.auth`) need them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import grpc

from ..errors import SecurityError

__all__ = ["ChannelSecurity", "open_channel", "is_loopback", "target_host", "join_host_port",
           "read_pem", "TOKEN_ENV"]

TOKEN_ENV = "LOOPS_TOKEN"

# --------------------------------------------------------------------------- addresses
def is_loopback(host: str) -> bool:
    """True when ``host`` (an IP literal, ``localhost`` or a name) only ever means this
    machine. ``""``, ``0.0.0.0`` and ``::`` (every interface) are not loopback."""
    host = host.strip().strip("[]")
    if not host:
        return False
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:   # a name: loopback only if every address it resolves to is
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def target_host(target: str) -> str:
    """The host part of a gRPC target (``host:port``, ``[v6]:port``, ``dns:///host:port``,
    ``ipv4:a.b.c.d:port``); ``"localhost"`` for ``unix:`` sockets, which are local."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return "localhost"
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme):]
            break
    t = t.split(",")[0]
    if t.startswith("["):
        return t[1:t.find("]")] if "]" in t else t
    if t.count(":") == 1:
        return t.rsplit(":", 1)[0]
    return t   # no port, or a bare IPv6 literal


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed (``[::1]:7070``)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def read_pem(path: str | os.PathLike | None, what: str) -> bytes | None:
    """The bytes of a certificate/key file, None for no path; a SecurityError naming ``what``."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"{what} {str(path)!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client connects to a LOOPS server.

    Attributes:
        token: bearer token sent with every call; None = none (see :meth:`with_env_token`).
        tls: use TLS with the system's root certificates (implied by ``tls_ca``).
        tls_ca: PEM CA bundle that signed the server's certificate.
        tls_cert, tls_key: PEM client certificate and key, for servers requiring mutual TLS.
        server_name: expected name in the server certificate when it differs from the
            target's host (e.g. connecting by IP to a certificate for a DNS name).
        insecure: allow sending a token in plaintext to a non-loopback address.
    """

    token: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    server_name: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("tls_cert and tls_key (--tls-client-cert/--tls-client-key) "
                                "go together")
        if self.token is not None and (not self.token or not all(
                33 <= ord(c) < 127 for c in self.token)):
            raise SecurityError("token must be non-empty printable ASCII without spaces")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def with_env_token(self) -> "ChannelSecurity":
        """This, with ``token`` taken from ``$LOOPS_TOKEN`` when not set here."""
        if self.token is not None or not os.environ.get(TOKEN_ENV):
            return self
        from dataclasses import replace
        return replace(self, token=os.environ[TOKEN_ENV].strip())


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the bearer token) to every call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def _details(self, details: Any) -> Any:
        return _CallDetails(details.method, details.timeout,
                            tuple(details.metadata or ()) + self._metadata,
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def open_channel(target: str, security: ChannelSecurity | None = None, *,
                 options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = ()) -> grpc.Channel:
    """Open a channel to a LOOPS server (the caller closes it; it is a context manager).

    TLS when ``security`` asks for it; the token (and any extra ``metadata``) goes with every
    call. ``security=None`` is a plaintext channel without a token.

    Raises:
        SecurityError: a token would travel in plaintext to a non-loopback address without
            ``insecure``; unreadable certificate files.
    """
    sec = security or ChannelSecurity()
    opts = list(options)
    if sec.uses_tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=read_pem(sec.tls_ca, "TLS CA"),
            private_key=read_pem(sec.tls_key, "TLS client key"),
            certificate_chain=read_pem(sec.tls_cert, "TLS client certificate"))
        if sec.server_name:
            opts.append(("grpc.ssl_target_name_override", sec.server_name))
        channel = grpc.secure_channel(target, creds, options=opts)
    else:
        if sec.token is not None and not sec.insecure and not is_loopback(target_host(target)):
            raise SecurityError(f"refusing to send a token in plaintext to {target!r}: use TLS "
                                "(tls_ca / --tls-ca) or pass insecure=True (--insecure)")
        channel = grpc.insecure_channel(target, options=opts)
    extra = list(metadata)
    if sec.token is not None:
        extra.append(("authorization", f"Bearer {sec.token}"))
    if extra:
        channel = grpc.intercept_channel(channel, _MetadataInterceptor(extra))
    return channel
