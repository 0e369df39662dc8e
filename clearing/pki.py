"""The city network's small PKI (wire.md "Identity (TLS)"): one network root CA, a CA per city under it, and a
certificate per device: ``terminal:{12 hex}`` and ``clearing:{city}`` issued by their city's CA (a terminal's city
is the first four digits of its number), the broker's server certificate issued by the root.

It lives with the clearing because running it is back-office work (the city that clears also enrols its
terminals); terminals only read the files it writes (``terminals/mqtt.py``) and never import it.

A PKI folder (``Pki.create``) holds::

    index.json      every certificate issued: serial, subject, issuing CA, validity, revoked or not
    chain.pem       the root and every city CA: what the broker trusts (Mosquitto's cafile)
    crl.pem         the CRL of every CA, root included (Mosquitto's crlfile)
    acl             the broker's ACL: each terminal's and clearing's topics (Mosquitto's acl_file)
    ca/root/        cert.pem, key.pem (0600), crl.pem
    ca/{city}/      the same for each city CA
    devices/{kind}-{name}/   cert.pem (the device, then its CA), key.pem (0600), ca.pem (the root)

Private keys are created with mode 0600 (never widened after) and are never logged or printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from terminals.messages import ack_topic, health_topic, interop_ack_topic, interop_txn_topic, txn_topic

DEMO_CITIES = ("4510", "4530", "4560")
ROOT = "root"
TERMINAL_DAYS = 30
CLEARING_DAYS = 90
SERVER_DAYS = 365
ROOT_DAYS = 3650
CITY_CA_DAYS = 1825
CRL_DAYS = 7  # an expired CRL makes OpenSSL refuse every client: `pki crl` must run well within this
Kind = Literal["terminal", "clearing", "server"]

_CITY = re.compile(r"[0-9]{4}")
_TERMINAL = re.compile(r"[0-9]{4}[0-9A-Fa-f]{8}")
_HOST = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class PkiError(Exception):
    """The PKI cannot do what was asked (no such folder, city or serial, a bad device name): one line."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: a terminal (12 hex), a city's clearing, or the broker (a host name or address)."""

    kind: Kind
    name: str

    @classmethod
    def terminal(cls, number: str) -> Identity:
        """A terminal by its 12-hex-digit number, whose first four digits are its city."""
        if not _TERMINAL.fullmatch(number):
            raise PkiError(
                f"terminal {number!r}: expected 12 hex digits starting with the 4-digit city, e.g. 456000000777"
            )
        return cls("terminal", number.upper())  # as terminals write it in their topics

    @classmethod
    def clearing(cls, city: str) -> Identity:
        """A city's clearing."""
        if not _CITY.fullmatch(city):
            raise PkiError(f"city {city!r}: expected a 4-digit city code such as 4510")
        return cls("clearing", city)

    @classmethod
    def server(cls, host: str) -> Identity:
        """The broker, by the host name or IP address clients connect to."""
        if not (_HOST.fullmatch(host) or _is_ip(host)):
            raise PkiError(f"server {host!r}: expected a host name or an IP address")
        return cls("server", host)

    @property
    def common_name(self) -> str:
        """The subject CN; Mosquitto's use_identity_as_username makes it the MQTT username."""
        return self.name if self.kind == "server" else f"{self.kind}:{self.name}"

    @property
    def city(self) -> str:
        """The CA that issues it: the device's city, or ``root`` for the broker."""
        return ROOT if self.kind == "server" else self.name[:4]

    @property
    def folder(self) -> str:
        """Its folder under ``devices/``."""
        return f"{self.kind}-{self.name}"


@dataclass(frozen=True)
class Issued:
    """One certificate of the index."""

    serial: str  # hex, as openssl prints it
    subject: str  # the CN
    kind: Kind
    ca: str  # the issuing CA: a city or "root"
    not_before: str
    not_after: str
    revoked: str | None = None  # when, ISO 8601

    def valid_at(self, now: dt.datetime) -> bool:
        """Not revoked and within its validity."""
        return self.revoked is None and self.not_before <= _iso(now) <= self.not_after


def _is_ip(text: str) -> bool:
    if "%" in text:  # an IPv6 scope names an interface of one machine: no certificate can carry it
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 from the start (a temporary name, then renamed over ``path``), so it is never
    readable by others, not even for a moment."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    """Write a certificate, CRL, index or ACL whole (a reader such as a reloading broker never sees half)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "yikatong"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_name(city: str) -> str:
    return "yikatong network root CA" if city == ROOT else f"yikatong city {city} CA"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Pki:
    """A PKI folder (see the module docstring): its CAs, index, CRLs and broker ACL."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if not (folder / "ca" / ROOT / "cert.pem").is_file():
            raise PkiError(f"{folder}: not a PKI folder (no ca/root/cert.pem): run 'yikatong pki init --out {folder}'")

    @classmethod
    def create(cls, folder: Path, cities: Iterable[str] = DEMO_CITIES) -> Pki:
        """A PKI in ``folder``: the root CA unless it is there, and each city's CA that is missing (keys already
        there are never replaced); then the chain, the CRLs and the ACL."""
        (folder / "ca" / ROOT).mkdir(parents=True, exist_ok=True)
        if not (folder / "ca" / ROOT / "cert.pem").is_file():
            _new_ca(folder / "ca" / ROOT, ROOT, None)
        pki = cls(folder)
        for city in cities:
            if not (folder / "ca" / city / "cert.pem").is_file():
                (folder / "ca" / city).mkdir(parents=True, exist_ok=True)
                _new_ca(folder / "ca" / city, city, pki._ca(ROOT))
        pki.write_chain()
        pki.write_crls()
        pki.write_acl()
        return pki

    def cities(self) -> list[str]:
        """The cities that have a CA here."""
        return sorted(p.name for p in (self.folder / "ca").iterdir() if _CITY.fullmatch(p.name))

    def _ca(self, city: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        folder = self.folder / "ca" / city
        if not (folder / "cert.pem").is_file():
            have = ", ".join(self.cities()) or "none"
            raise PkiError(
                f"no CA for city {city} in {self.folder} (cities: {have}): "
                f"run 'yikatong pki init --out {self.folder} --city {city}'"
            )
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    # --- the index ------------------------------------------------------------------------------------------

    def index(self) -> list[Issued]:
        """Every certificate issued here, oldest first."""
        path = self.folder / "index.json"
        if not path.is_file():
            return []
        return [Issued(**entry) for entry in json.loads(path.read_text())["certificates"]]

    def _save_index(self, entries: list[Issued]) -> None:
        doc = {"certificates": [asdict(e) for e in entries]}
        _write_public(self.folder / "index.json", (json.dumps(doc, indent=1) + "\n").encode())

    # --- issuing and revoking -------------------------------------------------------------------------------

    def issue(
        self,
        identity: Identity,
        *,
        days: int | None = None,
        out: Path | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[Issued, Path]:
        """A new key and certificate for ``identity``, written to ``out`` (default ``devices/{kind}-{name}``);
        valid ``days`` (defaults by kind) from now, or exactly ``not_before``..``not_after`` (tests make expired
        certificates so). Recorded in the index; a terminal's or clearing's topics go into the ACL."""
        issued, folder = self._make(identity, days=days, out=out, not_before=not_before, not_after=not_after)
        self._save_index([*self.index(), issued])
        self.write_acl()
        return issued, folder

    def issue_all(self, identities: Iterable[Identity]) -> list[Issued]:
        """``issue`` for each of ``identities`` with its default validity, the index and the ACL written once at
        the end (written after each, a fleet of N costs N times the index: quadratic). PkiError, with nothing
        issued, when a city of theirs has no CA here."""
        wanted = list(identities)
        for city in sorted({identity.city for identity in wanted}):
            self._ca(city)
        made = [self._make(identity)[0] for identity in wanted]
        if made:
            self._save_index([*self.index(), *made])
            self.write_acl()
        return made

    def _make(
        self,
        identity: Identity,
        *,
        days: int | None = None,
        out: Path | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[Issued, Path]:
        """The key and certificate of ``issue``, written to their folder; neither indexed nor in the ACL yet."""
        ca_cert, ca_key = self._ca(identity.city)
        start = not_before or _now() - dt.timedelta(minutes=5)  # a little slack for clocks a bit behind
        default_days = {"terminal": TERMINAL_DAYS, "clearing": CLEARING_DAYS, "server": SERVER_DAYS}[identity.kind]
        end = not_after or start + dt.timedelta(days=days or default_days)
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if identity.kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(identity.common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_authority_key_id(ca_cert), critical=False)
        )
        if identity.kind == "server":
            name = (
                x509.IPAddress(ipaddress.ip_address(identity.name))
                if _is_ip(identity.name)
                else x509.DNSName(identity.name)
            )
            builder = builder.add_extension(x509.SubjectAlternativeName([name]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        folder = out or self.folder / "devices" / identity.folder
        folder.mkdir(parents=True, exist_ok=True)
        write_private(folder / "key.pem", _key_pem(key))
        chain = _pem(cert) + (b"" if identity.city == ROOT else _pem(ca_cert))
        _write_public(folder / "cert.pem", chain)
        _write_public(folder / "ca.pem", (self.folder / "ca" / ROOT / "cert.pem").read_bytes())
        issued = Issued(
            f"{cert.serial_number:X}", identity.common_name, identity.kind, identity.city, _iso(start), _iso(end)
        )
        return issued, folder

    def holds_valid(self, identity: Identity, now: dt.datetime | None = None) -> bool:
        """Whether ``devices/{kind}-{name}`` holds a certificate of this PKI's index that is valid ``now`` and not
        revoked (what the demo reuses instead of issuing again)."""
        return not self.lacking([identity], now)

    def lacking(self, identities: Iterable[Identity], now: dt.datetime | None = None) -> list[Identity]:
        """Those of ``identities`` that ``holds_valid`` would say no to (the index read once for all)."""
        moment = now or _now()
        valid = {(e.serial, e.subject) for e in self.index() if e.valid_at(moment)}
        return [identity for identity in identities if (self._serial_in(identity), identity.common_name) not in valid]

    def _serial_in(self, identity: Identity) -> str | None:
        """The serial of the certificate in the identity's device folder (None: no certificate and key there)."""
        path = self.folder / "devices" / identity.folder / "cert.pem"
        if not (path.is_file() and (path.parent / "key.pem").is_file()):
            return None
        try:
            return f"{x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number:X}"
        except ValueError:
            return None

    def revoke(self, serial: str) -> Issued:
        """Revoke a certificate by its serial (hex, as ``openssl x509 -serial`` prints it): recorded in the index,
        in its CA's CRL (rewritten now, with crl.pem) and out of the ACL."""
        wanted = serial.strip().upper().removeprefix("0X").lstrip("0")
        entries = self.index()
        for n, entry in enumerate(entries):
            if entry.serial.lstrip("0") == wanted and wanted:
                if entry.revoked is not None:
                    return entry
                entries[n] = Issued(**{**asdict(entry), "revoked": _iso(_now())})
                self._save_index(entries)
                self.write_crls()
                self.write_acl()
                return entries[n]
        raise PkiError(f"serial {serial!r}: no certificate with that serial in {self.folder}/index.json")

    # --- what the broker reads ------------------------------------------------------------------------------

    def write_chain(self) -> None:
        """``chain.pem``: the root, then every city CA."""
        certs = [self.folder / "ca" / ca / "cert.pem" for ca in [ROOT, *self.cities()]]
        _write_public(self.folder / "chain.pem", b"".join(p.read_bytes() for p in certs))

    def write_crls(self, now: dt.datetime | None = None) -> None:
        """A fresh CRL for every CA (valid CRL_DAYS) and ``crl.pem``, all of them: with CRL checking on, OpenSSL
        refuses a certificate whose CA has no CRL in the file, so every city's must be there."""
        now = now or _now()
        revoked = [e for e in self.index() if e.revoked is not None]
        pems = []
        for city in [ROOT, *self.cities()]:
            ca_cert, ca_key = self._ca(city)
            path = self.folder / "ca" / city / "crl.pem"
            number = _crl_number(path) + 1
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(ca_cert.subject)
                .last_update(now - dt.timedelta(minutes=5))
                .next_update(now + dt.timedelta(days=CRL_DAYS))
                .add_extension(x509.CRLNumber(number), critical=False)
                .add_extension(_authority_key_id(ca_cert), critical=False)
            )
            for entry in revoked:
                if entry.ca == city:
                    builder = builder.add_revoked_certificate(
                        x509.RevokedCertificateBuilder()
                        .serial_number(int(entry.serial, 16))
                        .revocation_date(dt.datetime.strptime(entry.revoked or "", "%Y-%m-%dT%H:%M:%SZ"))
                        .build()
                    )
            pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
            _write_public(path, pem)
            pems.append(pem)
        _write_public(self.folder / "crl.pem", b"".join(pems))

    def write_acl(self, now: dt.datetime | None = None) -> None:
        """``acl``: a user block per terminal and clearing holding a valid certificate (Mosquitto's ``pattern``
        can only put the whole username, ``terminal:{number}``, into a topic, and the topics need the city and the
        number apart), and every issuer's hotlist readable by all."""
        moment = now or _now()
        names = sorted({(e.kind, e.subject) for e in self.index() if e.kind != "server" and e.valid_at(moment)})
        lines = [
            "# Mosquitto acl_file written by 'yikatong pki' from index.json: do not edit, it is rewritten on issue,",
            "# revoke and 'pki crl'. The username is the certificate's CN (use_identity_as_username true).",
            "pattern read yikatong/+/hotlist/#",
        ]
        for kind, subject in names:
            name = subject.split(":", 1)[1]
            lines += ["", f"user {subject}", *acl_topics(Identity(kind, name))]
        _write_public(self.folder / "acl", ("\n".join(lines) + "\n").encode())

    def mosquitto_listener(self, server: Path, port: int = 8883, bind: str | None = None) -> str:
        """The lines of a mosquitto.conf for a TLS listener that takes only clients with a certificate of this
        network, names each by its CN, checks the CRL and applies the ACL; ``server`` is the broker's folder
        (``pki issue --server``)."""
        for needed in ("cert.pem", "key.pem"):
            if not (server / needed).is_file():
                raise PkiError(f"{server}: no {needed}: issue it with 'yikatong pki issue --server HOST'")
        top, srv = self.folder.resolve(), server.resolve()
        return "\n".join(
            [
                "# TLS listener written by 'yikatong pki mosquitto-conf'",
                "per_listener_settings false",
                f"listener {port}" + (f" {bind}" if bind else ""),
                f"cafile {top / 'chain.pem'}",
                f"certfile {srv / 'cert.pem'}",
                f"keyfile {srv / 'key.pem'}",
                f"crlfile {top / 'crl.pem'}",
                "require_certificate true",
                "use_identity_as_username true",
                "tls_version tlsv1.2",
                "allow_anonymous false",
                f"acl_file {top / 'acl'}",
                "",
            ]
        )


def acl_topics(identity: Identity) -> list[str]:
    """The ACL lines of one terminal or clearing (wire.md): a terminal publishes its records and reads its acks
    (and, by the file's pattern, every hotlist); a clearing reads its city's records and interop traffic, acks,
    forwards to and answers other cities, and keeps its hotlist and health."""
    if identity.kind == "terminal":
        city = identity.name[:4]
        return [f"topic write {txn_topic(city, identity.name)}", f"topic read {ack_topic(city, identity.name)}"]
    city = identity.name
    return [
        f"topic read {txn_topic(city, '+')}",
        f"topic write {ack_topic(city, '+')}",
        f"topic readwrite yikatong/{city}/hotlist/#",
        f"topic readwrite {health_topic(city)}",
        f"topic read {interop_txn_topic(city)}",
        f"topic read {interop_ack_topic(city)}",
        f"topic write {interop_txn_topic('+')}",
        f"topic write {interop_ack_topic('+')}",
    ]


def _key_usage(*, digital_signature: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
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


def _new_ca(folder: Path, city: str, parent: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None) -> None:
    """A CA key and certificate in ``folder``: the root (self-signed, may have one CA under it) or a city CA
    (issues device certificates only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - dt.timedelta(minutes=5)
    subject = _name(_ca_name(city))
    issuer_cert, issuer_key = parent if parent else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=ROOT_DAYS if parent is None else CITY_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1 if parent is None else 0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(_authority_key_id(issuer_cert), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    write_private(folder / "key.pem", _key_pem(key))
    _write_public(folder / "cert.pem", _pem(cert))


def _crl_number(path: Path) -> int:
    """The number of the CRL in ``path`` (0 when there is none yet): each new CRL of a CA counts up."""
    if not path.is_file():
        return 0
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
