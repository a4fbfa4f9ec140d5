"""Security for every LOOPS gRPC service: TLS, bearer tokens with roles, the insecure posture.

Servers (the learner and the decision service) take a :class:`ServerSecurity`:

- **TLS**: a server certificate and key; optionally a client CA, which makes client
  certificates mandatory (mutual TLS).
- **Tokens**: a :class:`TokenSet` of bearer tokens, each with a role. ``client`` may report
  feedback, watch and read policies and decide; ``admin`` may also publish and roll back. A
  call without a known token is ``UNAUTHENTICATED``; a known token whose role is too low is
  ``PERMISSION_DENIED``. Health checking and server reflection stay open (standard practice:
  load balancers and ``grpcurl`` must reach them). Tokens are kept as SHA-256 digests,
  compared in constant time, and never logged.
- **Posture**: with neither TLS nor tokens a server binds only to a loopback address (today's
  local behaviour); any other address needs TLS *and* tokens, or an explicit
  ``insecure=True`` (``--insecure``).

Clients (``ClientConfig``, the CLI, backends) open channels with :func:`open_channel` and a
:class:`ChannelSecurity`: a CA to verify the server (or ``tls=True`` for the system roots), an
optional client certificate, and a token sent as ``authorization: Bearer <token>`` metadata.
A token is never sent in plaintext to a non-loopback address unless ``insecure=True``.

:func:`make_dev_certs` (``loops dev-certs DIR``) writes a self-signed CA, a server certificate
for localhost and a client certificate for local use; it needs the optional ``cryptography``
package.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import grpc

from .errors import SecurityError

__all__ = [
    "ROLE_CLIENT", "ROLE_ADMIN", "ROLES", "TokenSet", "ServerSecurity", "ChannelSecurity",
    "TokenAuthInterceptor", "open_channel", "is_loopback", "target_host", "join_host_port",
    "LEARNER_METHOD_ROLES", "DECISION_METHOD_ROLES", "OPEN_SERVICES", "DevCerts",
    "make_dev_certs", "TOKEN_ENV", "MIN_TOKEN_LENGTH",
]

logger = logging.getLogger(__name__)

ROLE_CLIENT = "client"
ROLE_ADMIN = "admin"
ROLES = (ROLE_CLIENT, ROLE_ADMIN)
_RANK = {ROLE_CLIENT: 1, ROLE_ADMIN: 2}   # a role may do everything a lower one may

TOKEN_ENV = "LOOPS_TOKEN"
MIN_TOKEN_LENGTH = 16

# Which role each RPC needs. A method of a protected service missing from these maps needs
# ``admin`` (deny by default: a new RPC is never accidentally open to every client).
LEARNER_METHOD_ROLES: dict[str, str] = {
    "/loops.v1.LearnerService/ReportFeedback": ROLE_CLIENT,
    "/loops.v1.LearnerService/WatchPolicy": ROLE_CLIENT,
    "/loops.v1.LearnerService/GetPolicy": ROLE_CLIENT,
    "/loops.v1.LearnerService/GetStatus": ROLE_CLIENT,
    "/loops.v1.LearnerService/GetHistory": ROLE_CLIENT,
    "/loops.v1.LearnerService/PublishPolicy": ROLE_ADMIN,
    "/loops.v1.LearnerService/RollbackPolicy": ROLE_ADMIN,
    "/loops.v1.LearnerService/SetMode": ROLE_ADMIN,        # publishes a new version
    "/loops.v1.LearnerService/SetTraining": ROLE_ADMIN,    # pauses/resumes retraining
}
DECISION_METHOD_ROLES: dict[str, str] = {
    f"/loops.v1.DecisionService/{m}": ROLE_CLIENT
    for m in ("Decide", "DecideBatch", "Reward", "Observe", "Activate")
}
# Services anyone may call: health checking and reflection.
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


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


# --------------------------------------------------------------------------- tokens
def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenSet:
    """Bearer tokens and their roles.

    Only SHA-256 digests are kept. :meth:`role` compares the presented token's digest with
    every stored one using :func:`hmac.compare_digest` and without stopping at a match, so the
    time taken does not depend on which token (if any) matched.

    Args:
        pairs: ``(role, token)`` pairs; a role is ``"client"`` or ``"admin"``; a token is at
            least :data:`MIN_TOKEN_LENGTH` printable ASCII characters without spaces.

    Raises:
        SecurityError: unknown role, weak or malformed token, a token given two roles, or none.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        entries: dict[bytes, str] = {}
        for i, (role, token) in enumerate(pairs):
            where = f"token #{i + 1}"
            if role not in ROLES:
                raise SecurityError(f"{where}: unknown role {role!r} (roles: {', '.join(ROLES)})")
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise SecurityError(f"{where} ({role}): tokens must be at least "
                                    f"{MIN_TOKEN_LENGTH} characters")
            if not all(33 <= ord(c) < 127 for c in token):
                raise SecurityError(f"{where} ({role}): tokens must be printable ASCII without "
                                    "spaces")
            d = _digest(token)
            if entries.get(d, role) != role:
                raise SecurityError(f"{where}: the same token is listed with two roles")
            entries[d] = role
        if not entries:
            raise SecurityError("no tokens given")
        self._entries = tuple(entries.items())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TokenSet":
        """Read a tokens file: lines ``role token`` (``#`` comments and blank lines ignored), or
        JSON, either ``{"admin": ["tok", ...], "client": [...]}`` or
        ``[{"role": "admin", "token": "tok"}, ...]``. Warns when others may read the file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
            mode = p.stat().st_mode
        except OSError as exc:
            raise SecurityError(f"tokens file {str(p)!r}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("tokens file %s is readable by other users (chmod 600 it)", p)
        stripped = text.lstrip()
        pairs: list[tuple[str, str]] = []
        if stripped.startswith(("{", "[")):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SecurityError(f"tokens file {str(p)!r}: invalid JSON ({exc.msg}, line "
                                    f"{exc.lineno})") from None
            if isinstance(data, dict):
                for role, tokens in data.items():
                    if isinstance(tokens, str):
                        tokens = [tokens]
                    if not isinstance(tokens, list):
                        raise SecurityError(f"tokens file {str(p)!r}: {role!r} must map to a "
                                            "list of tokens")
                    pairs.extend((role, t) for t in tokens)
            elif isinstance(data, list):
                for i, item in enumerate(data):
                    if not isinstance(item, dict) or set(item) != {"role", "token"}:
                        raise SecurityError(f"tokens file {str(p)!r}: entry {i} must be "
                                            '{"role": ..., "token": ...}')
                    pairs.append((item["role"], item["token"]))
            else:
                raise SecurityError(f"tokens file {str(p)!r}: JSON must be an object or a list")
        else:
            for n, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise SecurityError(f"tokens file {str(p)!r} line {n}: expected "
                                        "'role token'")
                pairs.append((parts[0], parts[1]))
        try:
            return cls(pairs)
        except SecurityError as exc:
            raise SecurityError(f"tokens file {str(p)!r}: {exc}") from None

    def role(self, token: str | None) -> str | None:
        """The role of ``token``, or None for a missing or unknown token (constant time)."""
        if token is None:
            return None
        presented = _digest(token)
        found = None
        for digest, role in self._entries:   # no early exit: same time whichever matches
            if hmac.compare_digest(presented, digest):
                found = role
        return found

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> dict[str, int]:
        """How many tokens each role has (for logs; never the tokens)."""
        out = {r: 0 for r in ROLES}
        for _, role in self._entries:
            out[role] += 1
        return out

    def __repr__(self) -> str:
        c = self.counts()
        return f"TokenSet({c[ROLE_ADMIN]} admin, {c[ROLE_CLIENT]} client)"


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _service_of(method: str) -> str:
    # "/package.Service/Method" -> "package.Service"
    parts = method.split("/")
    return parts[1] if len(parts) == 3 else ""


def _denying_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
                     method: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails every call with ``code``."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        # The token is never part of the message or the log.
        logger.warning("rejected %s from %s: %s", method, context.peer(), code.name)
        context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Server interceptor enforcing bearer tokens and roles (see the module docstring).

    Args:
        tokens: the accepted tokens.
        method_roles: full method name (``/pkg.Service/Method``) -> required role; methods of
            protected services that are not listed need ``admin``.
        open_services: services callable without a token (health, reflection).
    """

    def __init__(self, tokens: TokenSet, method_roles: Mapping[str, str],
                 open_services: Iterable[str] = OPEN_SERVICES) -> None:
        self._tokens = tokens
        self._roles = dict(method_roles)
        self._open = frozenset(open_services)

    def refusal(self, method: str, metadata: Sequence[tuple[str, Any]] | None
                ) -> tuple[grpc.StatusCode, str] | None:
        """Why a call of ``method`` with ``metadata`` is refused, as (status, details); None
        when it may go on."""
        if _service_of(method) in self._open:
            return None
        role = self._tokens.role(_bearer(metadata))
        if role is None:
            return (grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token (send "
                    "metadata 'authorization: Bearer <token>')")
        needed = self._roles.get(method, ROLE_ADMIN)
        if _RANK[role] < _RANK[needed]:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"role {role!r} may not call {method} (needs {needed!r})")
        return None

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        refused = self.refusal(method, handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if handler is None or refused is None:   # unknown method: gRPC says UNIMPLEMENTED
            return handler
        return _denying_handler(handler, refused[0], refused[1], method)


# --------------------------------------------------------------------------- servers
def _read(path: str | os.PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"{what} {str(path)!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ServerSecurity:
    """How a LOOPS server authenticates itself and its callers.

    Attributes:
        tls_cert, tls_key: PEM server certificate (chain) and private key; both or neither.
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed.
        tokens: accepted bearer tokens; None = no token check.
        insecure: allow binding a non-loopback address without TLS and tokens.

    The default (nothing set) serves plaintext without tokens, on loopback addresses only.
    """

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tokens: TokenSet | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("tls_cert and tls_key (--tls-cert/--tls-key) go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SecurityError("tls_client_ca (--tls-client-ca) needs a server certificate "
                                "(--tls-cert/--tls-key)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check_bind(self, host: str) -> None:
        """Refuse a non-loopback ``host`` without TLS and tokens unless ``insecure``."""
        if is_loopback(host) or self.insecure or (self.tls and self.tokens is not None):
            return
        missing = " and ".join(m for m, ok in (("TLS (--tls-cert/--tls-key)", self.tls),
                                               ("tokens (--tokens)", self.tokens is not None))
                               if not ok)
        raise SecurityError(f"refusing to serve on non-loopback address {host!r} without "
                            f"{missing}; configure them, bind 127.0.0.1, or pass --insecure "
                            "(insecure=True) to accept the risk")

    def credentials(self) -> grpc.ServerCredentials | None:
        """Server TLS credentials (None = plaintext); reads the PEM files now."""
        if not self.tls:
            return None
        cert = _read(self.tls_cert, "TLS certificate")
        key = _read(self.tls_key, "TLS key")
        client_ca = _read(self.tls_client_ca, "TLS client CA")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def interceptors(self, method_roles: Mapping[str, str]) -> list[grpc.ServerInterceptor]:
        return [] if self.tokens is None else [TokenAuthInterceptor(self.tokens, method_roles)]

    def authorizer(self, method_roles: Mapping[str, str]
                   ) -> Callable[[str, Sequence[tuple[str, Any]]],
                                 tuple[grpc.StatusCode, str] | None] | None:
        """The token check of :meth:`interceptors` as a function of (method, metadata), for
        calls served outside gRPC's interceptor chain; None when no tokens are set."""
        return None if self.tokens is None else \
            TokenAuthInterceptor(self.tokens, method_roles).refusal

    def add_port(self, server: grpc.Server, host: str, port: int) -> int:
        """Check the posture, then bind ``host:port`` (TLS when configured). Returns the port.

        Raises:
            SecurityError: insecure non-loopback bind, unreadable certificate files.
            OSError: the address cannot be bound.
        """
        self.check_bind(host)
        address = join_host_port(host, port)
        creds = self.credentials()
        try:
            bound = (server.add_secure_port(address, creds) if creds is not None
                     else server.add_insecure_port(address))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if not bound:
            raise OSError(f"cannot listen on {address}")
        return bound

    def describe(self) -> str:
        """One line for the start-up log (no secrets)."""
        tls = ("TLS with client certificates" if self.tls_client_ca else "TLS") if self.tls \
            else "plaintext"
        tokens = f"tokens {self.tokens!r}" if self.tokens is not None else "no tokens"
        return f"{tls}, {tokens}" + (", insecure allowed" if self.insecure else "")


# --------------------------------------------------------------------------- clients
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
            root_certificates=_read(sec.tls_ca, "TLS CA"),
            private_key=_read(sec.tls_key, "TLS client key"),
            certificate_chain=_read(sec.tls_cert, "TLS client certificate"))
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


# --------------------------------------------------------------------------- dev certs
DEV_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevCerts:
    """Paths written by :func:`make_dev_certs`."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    tokens: Path

    def server_flags(self, mutual: bool = False) -> str:
        flags = f"--tls-cert {self.server_cert} --tls-key {self.server_key} --tokens {self.tokens}"
        return flags + (f" --tls-client-ca {self.ca_cert}" if mutual else "")

    def client_flags(self, mutual: bool = False) -> str:
        flags = f"--tls-ca {self.ca_cert}"
        return flags + (f" --tls-client-cert {self.client_cert} --tls-client-key "
                        f"{self.client_key}" if mutual else "")


def make_dev_certs(directory: str | os.PathLike, *, hosts: Sequence[str] = DEV_HOSTS,
                   days: int = 30, force: bool = False) -> DevCerts:
    """Write a self-signed CA, a server certificate for ``hosts``, a client certificate (for
    mutual TLS) and a tokens file with one fresh ``admin`` and one ``client`` token, for local
    use only. Keys and the tokens file are mode 0600, the directory 0700.

    Raises:
        ImportError: the optional ``cryptography`` package is missing.
        SecurityError: a file exists already (pass ``force=True``), bad ``hosts``/``days``.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise ImportError("making development certificates needs the optional 'cryptography' "
                          "package: pip install 'loops-sdk[dev-certs]'") from exc
    if not 1 <= int(days) <= 825:
        raise SecurityError("days must be between 1 and 825")
    if not hosts:
        raise SecurityError("at least one host name or address is needed")
    d = Path(directory)
    out = DevCerts(d, d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key",
                   d / "client.pem", d / "client.key", d / "tokens.txt")
    files = [out.ca_cert, out.ca_key, out.server_cert, out.server_key, out.client_cert,
             out.client_key, out.tokens]
    existing = [p.name for p in files if p.exists()]
    if existing and not force:
        raise SecurityError(f"{d} already holds {', '.join(existing)}; pass --force to replace")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=int(days))

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LOOPS development"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: Any, issuer: Any, pub: Any) -> Any:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(pub).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end))

    ca_key = key()
    ca_name = name("LOOPS development CA")
    ca = (builder(ca_name, ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: Any, sans: Sequence[str]) -> tuple[Any, Any]:
        k = key()
        b = (builder(name(cn), ca_name, k.public_key())
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), critical=False))
        if sans:
            alt = []
            for h in sans:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    alt.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return b.sign(ca_key, hashes.SHA256()), k

    server, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, hosts)
    client, client_key = leaf("loops-dev-client", ExtendedKeyUsageOID.CLIENT_AUTH, ())

    def pem_cert(c: Any) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    def pem_key(k: Any) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    tokens = (f"# role token (generated by loops dev-certs; local use only)\n"
              f"admin {secrets.token_urlsafe(32)}\nclient {secrets.token_urlsafe(32)}\n")
    for path, data, mode in ((out.ca_cert, pem_cert(ca), 0o644),
                             (out.ca_key, pem_key(ca_key), 0o600),
                             (out.server_cert, pem_cert(server), 0o644),
                             (out.server_key, pem_key(server_key), 0o600),
                             (out.client_cert, pem_cert(client), 0o644),
                             (out.client_key, pem_key(client_key), 0o600),
                             (out.tokens, tokens.encode(), 0o600)):
        _write_new(path, data, mode)
    return out


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` created with ``mode`` (never briefly more permissive)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)   # the umask may have narrowed it; never widened
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
