"""Tests for extproc.lab.certs: the lab's mesh CA issues the certificates Envoy is shown."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from extproc.lab import CertificateAuthority, spiffe_id


class TestCertificateAuthority:
    def test_spiffe_id_goes_in_a_uri_san(self) -> None:
        """The SPIFFE ID is a URI SAN, next to the DNS names."""
        ca = CertificateAuthority.create("mesh")
        cert = x509.load_pem_x509_certificate(
            ca.issue(spiffe_id=spiffe_id("web"), dns_names=["web.default"]).cert_pem
        )
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == ["spiffe://cluster.local/ns/default/sa/web"]
        assert sans.get_values_for_type(x509.DNSName) == ["web.default"]
        assert cert.issuer == ca.cert.subject

    def test_expired_certificate_ended_in_the_past(self) -> None:
        """`expired=True` gives a certificate whose validity is over."""
        issued = CertificateAuthority.create("mesh").issue(spiffe_id=spiffe_id("web"), expired=True)
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
        assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)

    def test_write_lays_out_chain_key_and_root(self, tmp_path: Path) -> None:
        """The chain file holds the leaf then the CA; the root file holds the CA."""
        ca = CertificateAuthority.create("mesh")
        files = ca.issue(dns_names=["web"]).write(tmp_path, "web")
        chain = x509.load_pem_x509_certificates(files.cert_chain.read_bytes())
        assert [c.subject for c in chain][1] == ca.cert.subject
        assert files.trusted_ca.read_bytes() == ca.cert_pem
        assert files.private_key.stat().st_mode & 0o777 == 0o600
