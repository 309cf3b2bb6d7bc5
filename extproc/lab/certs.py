"""A tiny mesh certificate authority: SPIFFE workload certificates for the lab's Envoy.

The lab needs real X.509 to make Envoy fail the way a mesh fails (a SAN that is not the
expected identity, a chain from another root, an expired certificate). EC P-256 keys keep
issuing fast. Envoy reads certificates from files, so `IssuedCert.write` lays a bundle out
the way istio-agent does: the chain, the key and the root.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LIFETIME = dt.timedelta(days=1)
# Backdating absorbs clock skew between issuing and Envoy's check.
_BACKDATE = dt.timedelta(minutes=5)
# Mesh workloads use one certificate both to serve and to call.
_WORKLOAD_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


@dataclass(frozen=True, slots=True)
class CertFiles:
    """Where a bundle was written: what Envoy's TLS contexts name by `filename`."""

    cert_chain: Path
    private_key: Path
    trusted_ca: Path


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A leaf certificate, its key, and the certificate of the CA that issued it (all PEM)."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def write(self, directory: Path, name: str) -> CertFiles:
        """Write `<name>-cert-chain.pem` (leaf, CA), `<name>-key.pem`, `<name>-root-cert.pem`.

        The chain carries the CA too, as Istio's does; a peer that does not trust that CA
        then reports "self signed certificate in certificate chain".
        """
        files = CertFiles(
            cert_chain=directory / f"{name}-cert-chain.pem",
            private_key=directory / f"{name}-key.pem",
            trusted_ca=directory / f"{name}-root-cert.pem",
        )
        files.cert_chain.write_bytes(self.cert_pem + self.ca_pem)
        files.private_key.write_bytes(self.key_pem)
        files.private_key.chmod(0o600)
        files.trusted_ca.write_bytes(self.ca_pem)
        return files


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A self-signed root that issues workload certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str) -> CertificateAuthority:
        """A new root CA whose subject is `O=<name>, CN=<name> root`."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root"),
            ]
        )
        now = _now()
        cert = (
            _builder(subject, subject, key.public_key(), now - _BACKDATE, now + 10 * _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        """The root certificate, PEM: the trust bundle for peers of this CA."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        *,
        spiffe_id: str | None = None,
        dns_names: Sequence[str] = (),
        expired: bool = False,
    ) -> IssuedCert:
        """A leaf for both TLS server and client use; the SPIFFE ID goes in a URI SAN.

        `expired` makes a certificate whose validity ended yesterday.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = spiffe_id or next(iter(dns_names), "workload")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            _builder(subject, self.cert.subject, key.public_key(), *_validity(expired=expired))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(_WORKLOAD_EKU, critical=False)
            .add_extension(_authority_key_id(self.cert), critical=False)
        )
        names = _subject_alt_names(spiffe_id, dns_names)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), key_pem, self.cert_pem)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _validity(*, expired: bool) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) of a workload certificate."""
    now = _now()
    if expired:
        return now - 2 * _LIFETIME, now - _LIFETIME
    return now - _BACKDATE, now + _LIFETIME


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _subject_alt_names(spiffe_id: str | None, dns_names: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    if spiffe_id is not None:
        names.insert(0, x509.UniformResourceIdentifier(spiffe_id))
    return names
