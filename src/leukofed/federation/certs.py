"""Certificates and keys of a Flower federation: TLS for every connection, EC keys that authenticate hospitals.

:func:`make_certificates` writes one folder the coordinator keeps and hands pieces out of::

    ca.crt                   the federation's root certificate: every SuperNode and `flwr` verify the SuperLink with it
    ca.key                   the CA's private key (0600): keep it offline, it signs SuperLink certificates
    superlink.crt            the SuperLink's TLS certificate (SANs: the given hosts, localhost, 127.0.0.1, ::1)
    superlink.key            its private key (0600)
    site-<n>.key             hospital n's SuperNode authentication key (OpenSSH EC P-384, 0600): goes to hospital n only
    site-<n>.pub             its public key: the coordinator registers it (`flwr supernode register site-<n>.pub`)

Every file is written atomically, private keys with mode 0600 from the start. Hospitals can also
make their own key pair (``ssh-keygen -t ecdsa -b 384``) and send only the public key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from leukofed.errors import LeukofedError
from leukofed.io import atomic_path

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # always in the SuperLink's certificate: local trials and tunnels
TLS_CURVE = ec.SECP256R1()  # the curve every TLS stack (httpx, uvicorn, browsers) accepts
AUTH_CURVE = ec.SECP384R1()  # a NIST curve, as Flower's SuperNode authentication requires
CA_FILE, CA_KEY_FILE = "ca.crt", "ca.key"
SERVER_CERT_FILE, SERVER_KEY_FILE = "superlink.crt", "superlink.key"


@dataclass(frozen=True)
class FederationCertificates:
    """Paths of what :func:`make_certificates` wrote."""

    folder: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[int, tuple[Path, Path]]  # site -> (private key, public key)


def certificate_paths(folder: Path, n_nodes: int) -> FederationCertificates:
    """Where :func:`make_certificates` puts each file in ``folder``."""
    folder = Path(folder)
    return FederationCertificates(
        folder, folder / CA_FILE, folder / CA_KEY_FILE, folder / SERVER_CERT_FILE, folder / SERVER_KEY_FILE,
        {site: (folder / f"site-{site}.key", folder / f"site-{site}.pub") for site in range(1, n_nodes + 1)},
    )


def make_certificates(folder: Path, hosts: list[str], n_nodes: int, validity_days: int) -> FederationCertificates:
    """Create a federation's CA, the SuperLink's TLS certificate and one authentication key pair per hospital.

    Parameters
    ----------
    folder : Path
        Output folder; must not hold a federation CA already (it would orphan every issued key).
    hosts : list of str
        DNS names or IP addresses under which hospitals reach the SuperLink.
    n_nodes : int
        Number of hospitals (SuperNodes), numbered 1..n.
    validity_days : int
        Lifetime of the certificates.

    Raises
    ------
    LeukofedError
        If ``folder`` already holds a CA, or a host name is empty.
    """
    paths = certificate_paths(folder, n_nodes)
    if paths.ca.exists():
        raise LeukofedError(f"{paths.ca}: the folder already holds a federation CA; pass another --out or delete the folder")
    if n_nodes < 1:
        raise LeukofedError(f"--nodes must be at least 1, got {n_nodes}")
    if any(not host.strip() for host in hosts):
        raise LeukofedError(f"--host: empty host name in {hosts}")
    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(days=validity_days)

    ca_key = ec.generate_private_key(TLS_CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leukofed federation CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signing=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(TLS_CURVE)
    names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    server_cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), ca_name, server_key.public_key(), now, until)
        .add_extension(x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signing=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths.ca_key, _pem_key(ca_key), PRIVATE_MODE)
    _write(paths.server_key, _pem_key(server_key), PRIVATE_MODE)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    for site, (private_path, public_path) in paths.node_keys.items():
        key = ec.generate_private_key(AUTH_CURVE)
        _write(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()), PRIVATE_MODE)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(public_path, public + f" leukofed-site-{site}\n".encode(), PUBLIC_MODE)
    _write(paths.ca, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)  # last: marks a complete folder
    return paths


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime, until: dt.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock differences between machines
        .not_valid_after(until)
    )


def _key_usage(signing: bool) -> x509.KeyUsage:
    """A CA signs certificates; a TLS server signs handshakes (ECDHE) and agrees keys."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=not signing, key_cert_sign=signing, crl_sign=signing, encipher_only=False, decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, content: bytes, mode: int) -> None:
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(content)
