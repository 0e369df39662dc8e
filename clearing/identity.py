"""Who published a terminal message (issue 18 item 3): the clearing checks the signed envelope of
``terminals.signing`` against the city network's PKI, as defence in depth behind the broker's ACL.

A certificate is trusted when it chains through this clearing's city CA to the network root (cryptography's
verifier: validity, basic constraints, key usage, client-auth extended key usage), is not on the city CA's CRL
(when one is given) and names a terminal (``CN=terminal:{12 HEX}``). A trusted certificate is cached by its
bytes, so each message then costs one ECDSA verification; validity and the CRL are checked again per message.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from terminals.signing import Sealed

if TYPE_CHECKING:
    from terminals.mqtt import TlsFiles

_TERMINAL_CN: Final = re.compile(r"terminal:([0-9A-F]{12})")
CACHE_MOST: Final = 100_000  # certificates remembered (trusted or refused); past that the cache starts afresh
CRL_CHECK_EVERY: Final = 1.0  # seconds between looks at the CRL file's modification time


class IdentityError(ValueError):
    """The network CA files cannot be used (no root, no CA of the clearing's city): one line."""


class IdentityRefusal(ValueError):
    """A signed message the clearing does not take; the text is the reason."""


@dataclass(frozen=True)
class _Trusted:
    """A certificate that chained to the city CA: what each message of it still needs."""

    terminal: str
    key: ec.EllipticCurvePublicKey
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


class Identities:
    """The signature checks of one city's clearing: ``check`` gives the terminal that signed a message, or raises
    IdentityRefusal with the reason; ``required`` says whether the intake refuses unsigned messages too. The CRL
    file, when given, is read again when it changes (looked at once per ``crl_every`` seconds at most)."""

    def __init__(
        self,
        city: str,
        roots: list[x509.Certificate],
        city_ca: x509.Certificate,
        *,
        crl: Path | None = None,
        required: bool = True,
        crl_every: float = CRL_CHECK_EVERY,
    ) -> None:
        self.city = city
        self.city_ca = city_ca
        self.crl = crl
        self.required = required
        self.crl_every = crl_every
        self._store = Store(roots)
        self._cache: dict[bytes, _Trusted | str] = {}
        self._revoked: frozenset[int] = frozenset()
        self._crl_seen: tuple[float, int] | None = None  # (mtime, size) of the CRL file last read
        self._crl_checked = float("-inf")
        if crl is not None and not self._read_crl():
            raise IdentityError(f"{crl}: no CRL of the city {city} CA in it (the PKI's crl.pem holds every CA's)")

    @classmethod
    def of(
        cls,
        city: str,
        tls: TlsFiles,
        *,
        crl: Path | None = None,
        required: bool = True,
        crl_every: float = CRL_CHECK_EVERY,
    ) -> Identities:
        """From the clearing's own TLS files: the roots in ``ca`` (self-signed certificates), the city CA found
        in ``cert`` or ``ca`` as the issuer of the clearing's certificate. IdentityError when they do not do."""
        try:
            authorities = x509.load_pem_x509_certificates(tls.ca.read_bytes())
            own = x509.load_pem_x509_certificates(tls.cert.read_bytes())
        except (OSError, ValueError) as err:
            raise IdentityError(f"network CA files {tls.ca}, {tls.cert}: {err}") from None
        roots = [c for c in authorities if c.subject == c.issuer]
        if not roots:
            raise IdentityError(f"{tls.ca}: no self-signed root CA certificate in it")
        issuer = own[0].issuer
        city_ca = next((c for c in [*own[1:], *authorities] if c.subject == issuer and c.subject != c.issuer), None)
        if city_ca is None:
            raise IdentityError(
                f"the CA that issued {tls.cert} ({issuer.rfc4514_string()}) is in neither {tls.cert} nor {tls.ca}"
            )
        return cls(city, roots, city_ca, crl=crl, required=required, crl_every=crl_every)

    def check(self, sealed: Sealed, now: dt.datetime | None = None) -> str:
        """The terminal number the envelope's certificate names, when the certificate is trusted now and signed
        the payload; IdentityRefusal (with the reason) otherwise."""
        moment = now or dt.datetime.now(dt.UTC)
        trusted = self._trusted(sealed.cert, moment)
        if isinstance(trusted, str):
            raise IdentityRefusal(trusted)
        if not trusted.not_before <= moment <= trusted.not_after:
            raise IdentityRefusal(f"certificate of terminal {trusted.terminal} not valid now (expired or not yet)")
        self._refresh_crl()
        if trusted.serial in self._revoked:
            raise IdentityRefusal(f"certificate of terminal {trusted.terminal} revoked (serial {trusted.serial:X})")
        try:
            trusted.key.verify(sealed.signature, sealed.payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise IdentityRefusal(f"signature does not match the payload (certificate of {trusted.terminal})") from None
        return trusted.terminal

    def _trusted(self, cert: bytes, now: dt.datetime) -> _Trusted | str:
        """The cached verdict on a certificate (base64 DER), made on first sight (one outside its validity is
        judged again each time: it may be a clock a little behind)."""
        known = self._cache.get(cert)
        if known is not None:
            return known
        try:
            leaf = x509.load_der_x509_certificate(base64.b64decode(cert, validate=True))
        except ValueError as err:  # binascii.Error and the DER parser's errors both are
            known = f"certificate unreadable: {str(err)[:120]}"
        else:
            if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
                return f"certificate of {_subject(leaf)} not valid now (expired or not yet)"
            known = self._verify(leaf, now)
        if len(self._cache) >= CACHE_MOST:
            self._cache.clear()
        self._cache[cert] = known
        return known

    def _verify(self, leaf: x509.Certificate, now: dt.datetime) -> _Trusted | str:
        if leaf.issuer != self.city_ca.subject:
            return f"certificate of {_subject(leaf)} not issued by the CA of city {self.city}"
        try:  # the city CA is the only intermediate offered: the chain must run through it to a root
            self._verifier(now).verify(leaf, [self.city_ca])
        except VerificationError as err:
            return f"certificate of {_subject(leaf)} not issued under the network root: {str(err)[:160]}"
        names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        found = _TERMINAL_CN.fullmatch(str(names[0].value)) if len(names) == 1 else None
        if found is None:
            return f"certificate of {_subject(leaf)} names no terminal (CN terminal:NUMBER)"
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return "certificate key is not an EC key (records are signed with ECDSA)"
        return _Trusted(found.group(1), key, leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc)

    def _verifier(self, moment: dt.datetime) -> ClientVerifier:
        """A verifier as of ``moment`` (each keeps the time it was built for)."""
        # pki.py issues terminal certificates without a subjectAltName (the CN names them): allow its absence
        leaf = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
        )
        return (
            PolicyBuilder()
            .store(self._store)
            .time(moment)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf)
            .build_client_verifier()
        )

    def _refresh_crl(self) -> None:
        """Read the CRL file again when it changed (``pki revoke`` and ``pki crl`` rewrite it), at most once per
        ``crl_every`` seconds."""
        if self.crl is None or time.monotonic() - self._crl_checked < self.crl_every:
            return
        self._read_crl()

    def _read_crl(self) -> bool:
        """Take the serials the city CA's CRL in ``crl`` revokes (a file of several CRLs, as ``pki`` writes
        crl.pem: the one the city CA signed counts), when the file changed; whether it held that CRL. A file
        without it, or unreadable, keeps the serials read last."""
        assert self.crl is not None
        self._crl_checked = time.monotonic()
        try:
            stat = os.stat(self.crl)
            if self._crl_seen == (stat.st_mtime, stat.st_size):
                return True
            text = self.crl.read_bytes()
        except OSError:
            return False
        public = self.city_ca.public_key()
        revoked: set[int] | None = None
        for block in re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", text, re.DOTALL):
            try:
                crl = x509.load_pem_x509_crl(block)
            except ValueError:
                continue
            if (
                crl.issuer == self.city_ca.subject
                and isinstance(public, ec.EllipticCurvePublicKey)
                and crl.is_signature_valid(public)
            ):
                revoked = (revoked or set()) | {entry.serial_number for entry in crl}
        if revoked is None:
            return False
        self._crl_seen = (stat.st_mtime, stat.st_size)
        self._revoked = frozenset(revoked)
        return True


def _subject(cert: x509.Certificate) -> str:
    """A certificate's CN (its whole subject when it has no single CN), short: for a refusal's reason."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value)[:80] if len(names) == 1 else cert.subject.rfc4514_string()[:80]
