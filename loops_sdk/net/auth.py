"""Server-side security for every LOOPS gRPC service: TLS, bearer tokens with roles, the
insecure posture.

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

Clients use :mod:`loops_sdk.net.channel`; development certificates are made by
:mod:`loops_sdk.net.devcerts`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import grpc

from ..errors import SecurityError
from .channel import TOKEN_ENV, is_loopback, join_host_port, read_pem as _read, target_host

__all__ = [
    "ROLE_CLIENT", "ROLE_ADMIN", "ROLES", "TokenSet", "ServerSecurity", "TokenAuthInterceptor",
    "is_loopback", "target_host", "join_host_port", "LEARNER_METHOD_ROLES",
    "DECISION_METHOD_ROLES", "OPEN_SERVICES", "TOKEN_ENV", "MIN_TOKEN_LENGTH",
]

logger = logging.getLogger(__name__)

ROLE_CLIENT = "client"
ROLE_ADMIN = "admin"
ROLES = (ROLE_CLIENT, ROLE_ADMIN)
_RANK = {ROLE_CLIENT: 1, ROLE_ADMIN: 2}   # a role may do everything a lower one may
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
