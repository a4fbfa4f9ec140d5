"""Development certificates: :func:`make_dev_certs` (``loops dev-certs DIR``) writes a
self-signed CA, a server certificate for localhost, a client certificate and a tokens file for
local use; it needs the optional ``cryptography`` package.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import SecurityError

__all__ = ["DEV_HOSTS", "DevCerts", "make_dev_certs"]

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
