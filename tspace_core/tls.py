"""The small PKI of a coordinator: a CA, server and client certificates, and CA pinning."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tspace_core.errors import TspaceError

ADMIN_COMMON_NAME = "tspace-admin"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_CSR_BYTES = 8192

# Certificates are back-dated a little so a peer whose clock lags ours still accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)
MAX_COMMON_NAME = 64  # RFC 5280 ub-common-name
MIN_RSA_BITS = 2048
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_HEX64 = re.compile(r"[0-9a-f]{64}")

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class TlsError(TspaceError):
    """A certificate, key, CSR or pinned fingerprint that is missing, malformed or wrong."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes


# -- keys and certificates ----------------------------------------------------------------------


def new_key_pem() -> bytes:
    """A fresh EC P-256 private key as unencrypted PKCS8 PEM."""
    return _key_pem(ec.generate_private_key(ec.SECP256R1()))


def make_ca(common_name: str = "tspace coordinator CA", days: int = 3650) -> Issued:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    builder = (
        _validity(x509.CertificateBuilder(), days, None)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_server_cert(ca: Issued, hosts: Sequence[str], days: int = 825) -> Issued:
    """A server certificate for `hosts` (names or IP addresses) plus DEFAULT_HOSTS."""
    names = _server_names([*hosts, *DEFAULT_HOSTS])
    first = str(names[0].value)
    cn = first if len(first) <= MAX_COMMON_NAME else "tspace coordinator"
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(names)
    cert_pem = _issue(ca, cn, key.public_key(), days, ExtendedKeyUsageOID.SERVER_AUTH, san)
    return Issued(cert_pem, _key_pem(key))


def make_csr(key_pem: bytes, common_name: str = "tspace worker") -> bytes:
    """A certificate signing request for `key_pem`, signed by that key (proof of possession)."""
    key = _load_private_key(key_pem, "the private key")
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
    csr = builder.sign(key, _hash_for(key))
    return csr.public_bytes(serialization.Encoding.PEM)


def check_csr(csr_pem: bytes) -> None:
    """Refuse a CSR that sign_client_csr would refuse, without signing anything."""
    _checked_csr(csr_pem)


def sign_client_csr(ca: Issued, csr_pem: bytes, common_name: str, days: int = 365) -> bytes:
    """A client certificate for the key in `csr_pem`, named `common_name`; returns its PEM.

    Only the CSR's public key is used: its subject and extensions are the requester's words,
    and the coordinator alone decides what name the certificate carries.
    """
    public_key = _checked_csr(csr_pem)
    return _issue(ca, common_name, public_key, days, ExtendedKeyUsageOID.CLIENT_AUTH)


def make_client_cert(ca: Issued, common_name: str, days: int = 365) -> Issued:
    """A client key and certificate made in one step (for the admin's own certificate)."""
    key_pem = new_key_pem()
    return Issued(sign_client_csr(ca, make_csr(key_pem, common_name), common_name, days), key_pem)


def load_ca(cert_path: Path, key_path: Path) -> Issued:
    """Read a CA certificate and its key, checking they belong together and form a CA."""
    cert_pem = _read(Path(cert_path), "CA certificate")
    key_pem = _read(Path(key_path), "CA key")
    ca = Issued(cert_pem, key_pem)
    try:
        cert, _ = _issuer(ca)
    except TlsError as exc:
        raise TlsError(f"{cert_path} and {key_path} are not a usable CA: {exc}") from None
    if not _is_ca(cert):
        raise TlsError(
            f"{cert_path} is not a CA certificate; give the CA made by tspace-coord init."
        )
    return ca


def write_private(path: Path, data: bytes) -> None:
    """Write a secret to a new file created with mode 0600; never overwrite an existing file."""
    path = Path(path)
    try:
        # 0o600 at open: the secret is never readable by others, not even for an instant.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TlsError(f"{path} already exists; move it away or choose another path.") from None
    except OSError as exc:
        raise TlsError(f"cannot create {path}: {exc.strerror or exc}.") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)  # a half-written key is worse than none
        raise TlsError(f"cannot write {path}: {exc.strerror or exc}.") from None


# -- fingerprints and names ----------------------------------------------------------------------


def fingerprint(cert_pem: bytes) -> str:
    """ "sha256:" and the lowercase hex SHA-256 of the first certificate's DER."""
    return _fingerprint_der(_first_cert(cert_pem).public_bytes(serialization.Encoding.DER))


def normalize_fingerprint(text: str) -> str:
    """Accept "sha256:<hex>", OpenSSL's "AB:CD:..." (with or without its prefix) or bare hex."""
    value = text.strip()
    lowered = value.lower()
    for prefix in ("sha256 fingerprint=", "sha256:"):
        if lowered.startswith(prefix):
            value = value[len(prefix) :]
            break
    digits = value.strip().replace(":", "").lower()
    if not _HEX64.fullmatch(digits):
        raise TlsError(
            f"{text!r} is not a SHA-256 certificate fingerprint; give 64 hex digits, "
            "optionally as sha256:<hex> or AB:CD:... as openssl prints it."
        )
    return "sha256:" + digits


def common_name(cert_pem: bytes) -> str:
    """The subject common name of the first certificate in `cert_pem`."""
    attrs = _first_cert(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise TlsError("the certificate has no common name in its subject.")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# -- fetching a coordinator's CA by its pin -------------------------------------------------------


def fetch_ca(address: str, pinned: str, timeout: float = 10.0) -> bytes:
    """The PEM of the CA that the coordinator at `address` presents, if it matches `pinned`.

    The handshake is unverified on purpose: the pin is what makes the CA trustworthy. The
    handshake itself proves the server holds its leaf key, and the leaf must be signed by the
    pinned CA, so a party in between that merely replays the CA certificate is refused.
    """
    want = normalize_fingerprint(pinned)
    chain = _peer_chain(address, timeout)
    if not chain:
        raise TlsError(f"the coordinator at {address} presented no certificate.")
    presented = [_fingerprint_der(der) for der in chain]
    if want not in presented:
        raise TlsError(
            f"the coordinator at {address} presented {', '.join(presented)}, "
            f"not the pinned {want}: it is not the coordinator you pinned; "
            "check the fingerprint, or someone is in between."
        )
    ca = x509.load_der_x509_certificate(chain[presented.index(want)])
    if not _is_ca(ca):
        raise TlsError(
            f"the pinned certificate {want} is not a CA certificate; pin the coordinator's CA."
        )
    leaf = x509.load_der_x509_certificate(chain[0])
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TlsError(
            f"the coordinator at {address} presented the pinned CA, but its own certificate is "
            "not signed by it; someone may be in between."
        ) from None
    return ca.public_bytes(serialization.Encoding.PEM)


def _peer_chain(address: str, timeout: float) -> list[bytes]:
    """The DER certificates the server sends, leaf first, without verifying them."""
    host, port = _split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])  # a gRPC server refuses a handshake without it
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # Public from Python 3.13 (a list of DER bytes); private before (certificate objects).
            get_chain = getattr(tls, "get_unverified_chain", None)
            if get_chain is None:
                get_chain = tls._sslobj.get_unverified_chain  # type: ignore[attr-defined]
            chain = get_chain() or []
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot reach {address} over TLS: {exc}.") from None
    der = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009 - the private module has no stubs
    return [c if isinstance(c, bytes) else c.public_bytes(der) for c in chain]


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address must be bracketed to tell it from the port
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TlsError(
            f"{address!r} is not a coordinator address; write host:port, or [IPv6]:port."
        )
    return host, int(port)


# -- helpers ------------------------------------------------------------------------------------


def _fingerprint_der(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _first_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(cert_pem)[0]
    except (ValueError, TypeError):
        raise TlsError("the data is not a PEM certificate.") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _name(common_name: str) -> x509.Name:
    if not 0 < len(common_name) <= MAX_COMMON_NAME or not common_name.isprintable():
        raise TlsError(
            f"{common_name!r} is not a usable common name; give 1 to {MAX_COMMON_NAME} "
            "printable characters."
        )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _server_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Each host as an IP address or a checked DNS name, duplicates dropped, order kept."""
    names: list[x509.GeneralName] = []
    seen: set[object] = set()
    for host in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            _check_dns_name(host)
            key: object = host.lower()
            name: x509.GeneralName = x509.DNSName(host)
        else:
            key, name = ip, x509.IPAddress(ip)
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _check_dns_name(host: str) -> None:
    labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise TlsError(
            f"{host!r} is neither an IP address nor a DNS name; use letters, digits, '-' and '.', "
            "optionally starting with '*.'."
        )


def _check_client_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        ok = isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1)
    elif isinstance(key, rsa.RSAPublicKey):
        ok = key.key_size >= MIN_RSA_BITS
    else:
        ok = isinstance(key, ed25519.Ed25519PublicKey)
    if not ok:
        raise TlsError(
            "the CSR's key is too weak or of an unsupported type; use EC P-256 or P-384, "
            f"RSA of at least {MIN_RSA_BITS} bits, or Ed25519."
        )


def _checked_csr(csr_pem: bytes) -> CertificatePublicKeyTypes:
    """The public key of a bounded, parsable CSR with an acceptable key and a valid signature."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise TlsError(f"the CSR is {len(csr_pem)} bytes, over the {MAX_CSR_BYTES}-byte limit.")
    try:
        if csr_pem.lstrip().startswith(b"-----"):
            csr = x509.load_pem_x509_csr(csr_pem)
        else:
            csr = x509.load_der_x509_csr(csr_pem)
    except (ValueError, TypeError):
        raise TlsError("the data is not a certificate signing request in PEM or DER.") from None
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError):
        raise TlsError("the CSR's public key is of an unsupported type; use EC P-256.") from None
    _check_client_key(public_key)
    if not csr.is_signature_valid:
        raise TlsError(
            "the CSR's signature does not verify, so it does not prove possession of its key; "
            "make a new CSR with the private key."
        )
    return public_key


def _load_private_key(key_pem: bytes, what: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"{what} is not an unencrypted PEM private key.") from None
    if not isinstance(key, SigningKey):
        raise TlsError(f"{what} is of an unsupported type; use EC P-256.")
    return key


def _hash_for(key: SigningKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issuer(ca: Issued) -> tuple[x509.Certificate, SigningKey]:
    cert = _first_cert(ca.cert_pem)
    key = _load_private_key(ca.key_pem, "the CA key")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise TlsError("the CA key does not belong to the CA certificate.")
    return cert, key


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _validity(
    builder: x509.CertificateBuilder, days: int, ca_cert: x509.Certificate | None
) -> x509.CertificateBuilder:
    if days < 1:
        raise TlsError(f"a certificate must be valid for at least one day, not {days}.")
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=days)
    if ca_cert is not None:
        if ca_cert.not_valid_after_utc <= now:
            raise TlsError("the CA certificate has expired; make a new CA and new certificates.")
        not_after = min(not_after, ca_cert.not_valid_after_utc)  # never outlive the issuer
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)


def _issue(
    ca: Issued,
    common_name: str,
    public_key: CertificatePublicKeyTypes,
    days: int,
    usage: x509.ObjectIdentifier,
    *extensions: x509.ExtensionType,
) -> bytes:
    """An end-entity certificate for `usage`, issued and signed by `ca`; returns its PEM."""
    ca_cert, ca_key = _issuer(ca)
    builder = (
        _validity(x509.CertificateBuilder(), days, ca_cert)
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, _hash_for(ca_key)).public_bytes(serialization.Encoding.PEM)


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"the {what} {path} does not exist; run tspace-coord init.") from None
    except OSError as exc:
        raise TlsError(f"cannot read the {what} {path}: {exc.strerror or exc}.") from None
