"""The few MQTT packets a simulated terminal of the load generator exchanges with its broker, as bytes, without
I/O: CONNECT, SUBSCRIBE, PUBLISH (QoS 0 and 1), PUBACK, PINGREQ and DISCONNECT out; CONNACK, SUBACK, PUBLISH,
PUBACK, PINGRESP and DISCONNECT in. MQTT 3.1.1 (protocol level 4) and MQTT 5 (level 5, properties read past
but for CONNACK's Server Keep Alive, a session expiry interval sent).

``Decoder.feed`` takes bytes as they come off the socket and returns the whole packets in them; anything that is
not a well-formed packet a broker may send a client raises ``ProtocolError`` (the caller drops the connection),
never another exception. Packets whole before bad bytes in the same read are returned first (``Decoder.error``
then holds the error, and the next ``feed`` raises it): what the broker said before it went wrong is not lost.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MQTT311, MQTT5 = 4, 5
CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14
MAX_PACKET = 16 * 1024 * 1024  # bytes: far above a hotlist chunk; a broker sending more is not one we follow
SESSION_EXPIRY, SERVER_KEEP_ALIVE = 0x11, 0x13  # MQTT 5 property ids
# the size of each MQTT 5 property's value by its id: bytes, or VARINT, UTF8 (a length and the bytes: strings and
# binary data) and PAIR (two strings: a user property)
VARINT, UTF8, PAIR = -1, -2, -3
PROPERTY_SIZES = (
    dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1)
    | dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2)
    | dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4)
    | {0x0B: VARINT, 0x26: PAIR}
    | dict.fromkeys((0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F), UTF8)
)


class ProtocolError(Exception):
    """Bytes from the broker that are not an MQTT packet this client can take."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


def connect(
    client_id: str,
    *,
    version: int,
    clean: bool,
    keepalive: int,
    session_expiry: int | None = None,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """CONNECT; with MQTT 5 and ``session_expiry``, the Session Expiry Interval property."""
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _string("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == MQTT5:
        props = b"" if session_expiry is None else bytes([SESSION_EXPIRY]) + struct.pack("!I", session_expiry)
        body += _varint(len(props)) + props
    body += _string(client_id)
    if username is not None:
        body += _string(username)
    if password is not None:
        body += _string(password)
    return _packet(CONNECT, 0, body)


def subscribe(packet_id: int, filters: list[str], qos: int, *, version: int) -> bytes:
    """SUBSCRIBE to ``filters``, each at ``qos``."""
    body = struct.pack("!H", packet_id) + (b"\x00" if version == MQTT5 else b"")
    body += b"".join(_string(f) + bytes([qos]) for f in filters)
    return _packet(SUBSCRIBE, 0x02, body)


def publish(topic: str, payload: bytes, *, qos: int, packet_id: int = 0, version: int) -> bytes:
    """PUBLISH ``payload`` on ``topic`` (a packet id only at QoS 1)."""
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + (b"\x00" if version == MQTT5 else b"")
    return _packet(PUBLISH, qos << 1, body + payload)


def puback(packet_id: int) -> bytes:
    """PUBACK (success: the short form both versions take)."""
    return _packet(PUBACK, 0, struct.pack("!H", packet_id))


PINGREQ_PACKET = _packet(PINGREQ, 0, b"")
DISCONNECT_PACKET = _packet(DISCONNECT, 0, b"")  # MQTT 5: no reason code means normal disconnection


@dataclass(frozen=True)
class ConnAck:
    """The broker's answer to CONNECT (code 0: accepted); ``keepalive``: MQTT 5's Server Keep Alive, the seconds
    the client must use instead of those it asked for (None: as asked)."""

    session_present: bool
    code: int
    keepalive: int | None = None


@dataclass(frozen=True)
class SubAck:
    """The broker's answer to SUBSCRIBE: one code per filter (0-2 the granted QoS, 0x80 and up refused)."""

    packet_id: int
    codes: tuple[int, ...]


@dataclass(frozen=True)
class Publish:
    """A message on a subscribed topic."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int  # 0 at QoS 0
    retain: bool


@dataclass(frozen=True)
class PubAck:
    """The broker has a QoS 1 message this client published (``code`` 0x80 and up: refused, MQTT 5)."""

    packet_id: int
    code: int


@dataclass(frozen=True)
class PingResp:
    """The broker's answer to PINGREQ."""


@dataclass(frozen=True)
class Disconnect:
    """The broker ends the connection (MQTT 5 gives a reason code)."""

    code: int


Packet = ConnAck | SubAck | Publish | PubAck | PingResp | Disconnect


class _Reader:
    """Reads the fields of one packet's body; running past its end is a ``ProtocolError``."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.body):
            raise ProtocolError("packet shorter than its fields")
        out = self.body[self.at : self.at + n]
        self.at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def string(self) -> str:
        try:
            return self.take(self.u16()).decode()
        except UnicodeDecodeError:
            raise ProtocolError("a string that is not UTF-8") from None

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            digit = self.u8()
            value |= (digit & 0x7F) << shift
            if not digit & 0x80:
                return value
        raise ProtocolError("a variable-length integer of more than 4 bytes")

    def properties(self, version: int) -> None:
        if version == MQTT5:
            self.take(self.varint())

    def numbers(self, version: int) -> dict[int, int]:
        """The properties (MQTT 5) with a number for a value, by id; the others read past."""
        out: dict[int, int] = {}
        if version != MQTT5:
            return out
        props = _Reader(self.take(self.varint()))
        while props.at < len(props.body):
            prop = props.varint()
            size = PROPERTY_SIZES.get(prop)
            if size is None:
                raise ProtocolError(f"property {prop:#x} is not an MQTT 5 property")
            if size == VARINT:
                out[prop] = props.varint()
            elif size > 0:
                out[prop] = int.from_bytes(props.take(size), "big")
            else:
                for _ in range(2 if size == PAIR else 1):
                    props.take(props.u16())
        return out

    def rest(self) -> bytes:
        out = self.body[self.at :]
        self.at = len(self.body)
        return out


def _decode(kind: int, flags: int, body: bytes, version: int) -> Packet:
    r = _Reader(body)
    if kind == PUBLISH:
        qos = (flags >> 1) & 0x03
        if qos > 1:
            raise ProtocolError(f"PUBLISH at QoS {qos}: this client subscribes at QoS 1 at most")
        topic = r.string()
        packet_id = r.u16() if qos else 0
        r.properties(version)
        return Publish(topic, r.rest(), qos, packet_id, bool(flags & 0x01))
    if flags != 0:
        raise ProtocolError(f"packet type {kind} with flags {flags:#x}")
    if kind == CONNACK:
        session, code = r.u8(), r.u8()
        # a refusal may come without properties (MQTT 3.1.1 brokers answer an MQTT 5 CONNECT so)
        numbers = r.numbers(version) if r.at < len(body) else {}
        return ConnAck(bool(session & 0x01), code, numbers.get(SERVER_KEEP_ALIVE))
    if kind == PUBACK:
        packet_id = r.u16()
        return PubAck(packet_id, r.u8() if r.at < len(body) else 0)
    if kind == SUBACK:
        packet_id = r.u16()
        r.properties(version)
        codes = tuple(r.rest())
        if not codes:
            raise ProtocolError("SUBACK without a code")
        return SubAck(packet_id, codes)
    if kind == PINGRESP:
        return PingResp()
    if kind == DISCONNECT:
        return Disconnect(r.u8() if body else 0)
    raise ProtocolError(f"packet type {kind} is not one a broker sends this client")


class Decoder:
    """Whole packets out of a byte stream, for one connection of protocol ``version``."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.error: ProtocolError | None = None  # bad bytes after the packets the last feed returned
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        """The packets completed by ``data`` (what is left waits for more). Bad bytes raise ``ProtocolError``, but
        after whole packets before them in the stream: those are returned, the error kept in ``error`` and
        raised by the next call."""
        if self.error is not None:
            raise self.error
        self._buffer += data
        out: list[Packet] = []
        try:
            self._packets(out)
        except ProtocolError as err:
            if not out:
                raise
            self.error = err
        return out

    def _packets(self, out: list[Packet]) -> None:
        """Decode whole packets off the buffer into ``out``."""
        while len(self._buffer) >= 2:
            length, shift, at = 0, 0, 1
            while True:
                if at >= len(self._buffer):
                    return  # the length itself is not complete yet
                digit = self._buffer[at]
                length |= (digit & 0x7F) << shift
                at += 1
                if not digit & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ProtocolError("a remaining length of more than 4 bytes")
            if length > MAX_PACKET:
                raise ProtocolError(f"a packet of {length:,} bytes (at most {MAX_PACKET:,})")
            if len(self._buffer) < at + length:
                return
            head = self._buffer[0]
            body = bytes(self._buffer[at : at + length])
            del self._buffer[: at + length]
            out.append(_decode(head >> 4, head & 0x0F, body, self.version))
