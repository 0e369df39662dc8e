"""Signed uplink messages (``yikatong.signed/1``, wire.md "Identity (TLS)"): a terminal with a certificate signs
each message it publishes with its certificate's key and carries the certificate in it, so the clearing learns
who published (MQTT never tells a subscriber, and Mosquitto passes no username on).

The envelope has one fixed form, so that the signed bytes are the payload's own bytes, untouched::

    {"schema":"yikatong.signed/1","cert":"<base64 DER certificate>","sig":"<base64 DER ECDSA-SHA256>","payload":P}

where ``P`` is the record or batch exactly as it would be published unsigned, and the signature is over ``P``'s
bytes. The whole is still a JSON object; a reader splits it by its fixed prefix (``unseal``), never by
re-encoding JSON. Its two base64 strings are bounded here (``MAX_CERT``, ``MAX_SIG``), not by the 256-character
string limit, which applies to ``P`` as for any unsigned message.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from terminals.messages import MessageError

if TYPE_CHECKING:
    from terminals.mqtt import TlsFiles

SIGNED_SCHEMA: Final = "yikatong.signed/1"
MAX_CERT: Final = 4096
"""Base64 characters of the certificate at most (a P-256 terminal certificate takes about 650)."""
MAX_SIG: Final = 128
"""Base64 characters of the signature at most (a P-256 ECDSA signature in DER takes at most 96)."""
SIGNED_PREFIX: Final = b'{"schema":"' + SIGNED_SCHEMA.encode() + b'"'
_ENVELOPE = re.compile(
    re.escape(SIGNED_PREFIX)
    + rb',"cert":"([A-Za-z0-9+/]{1,%d}={0,2})","sig":"([A-Za-z0-9+/]{1,%d}={0,2})","payload":' % (MAX_CERT, MAX_SIG)
)


@dataclass(frozen=True)
class Sealed:
    """An opened envelope: the certificate as sent (base64 DER: the cache key of the verified ones), the
    signature and the signed payload's bytes."""

    cert: bytes
    signature: bytes
    payload: bytes


def is_sealed(payload: bytes) -> bool:
    """Whether the payload claims to be a signed envelope (``unseal`` says whether it is a good one)."""
    return payload.startswith(SIGNED_PREFIX)


def unseal(payload: bytes) -> Sealed:
    """The parts of a signed envelope (nothing verified yet); MessageError when it is not one in the fixed form."""
    found = _ENVELOPE.match(payload)
    if found is None or not payload.endswith(b"}") or len(payload) <= found.end() + 1:
        raise MessageError(
            f"not a {SIGNED_SCHEMA} envelope in its fixed form "
            '({"schema":..,"cert":"<base64>","sig":"<base64>","payload":{...}}, in that order, no spaces)'
        )
    try:
        signature = base64.b64decode(found.group(2), validate=True)
    except ValueError as err:  # binascii.Error: wrong padding
        raise MessageError(f"{SIGNED_SCHEMA}: sig is not base64: {err}") from err
    return Sealed(found.group(1), signature, payload[found.end() : -1])


def seal(payload: str, cert: str, signature: bytes) -> str:
    """The envelope of ``payload`` (``cert``: base64 DER), in the one form ``unseal`` takes."""
    sig = base64.b64encode(signature).decode()
    return f'{{"schema":"{SIGNED_SCHEMA}","cert":"{cert}","sig":"{sig}","payload":{payload}}}'


class Signer:
    """Signs a terminal's messages with its TLS certificate's key (ECDSA P-256, SHA-256)."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        if certificate.public_key() != key.public_key():
            raise ValueError("the private key does not belong to the certificate")
        self.cert = base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()
        if len(self.cert) > MAX_CERT:
            raise ValueError(f"the certificate takes {len(self.cert)} base64 characters, more than {MAX_CERT}")
        self._key = key

    @classmethod
    def of(cls, tls: TlsFiles) -> Signer:
        """The signer of a device's TLS files (the first certificate of ``cert``, and ``key``); ValueError when
        the key is no EC key or not the certificate's, OSError when a file cannot be read."""
        certificate = x509.load_pem_x509_certificates(tls.cert.read_bytes())[0]
        key = serialization.load_pem_private_key(tls.key.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{tls.key}: an EC key is needed to sign records (pki issue makes P-256 keys)")
        return cls(certificate, key)

    def seal(self, payload: str) -> str:
        """``payload`` in its signed envelope."""
        return seal(payload, self.cert, self._key.sign(payload.encode(), ec.ECDSA(hashes.SHA256())))
