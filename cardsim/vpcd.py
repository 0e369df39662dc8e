"""Serve a simulated card to pcscd through the vsmartcard vpcd virtual reader (the only I/O in cardsim).

vpcd listens on TCP (127.0.0.1:35963 for "Virtual PCD 00 00"); the card side connects to it. Frames are a
2-byte big-endian length and a payload. A 1-byte payload is a control: 00 power off, 01 power on, 02 reset,
04 send ATR; anything longer is a C-APDU, answered by the R-APDU in a frame of its own.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Final, Protocol

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 35963
CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0x00, 0x01, 0x02, 0x04


class ServedCard(Protocol):
    """What vpcd needs of a card."""

    def power_on(self) -> bytes: ...

    def power_off(self) -> None: ...

    def transmit(self, apdu: bytes) -> bytes: ...


def frame(payload: bytes) -> bytes:
    """One vpcd frame."""
    if len(payload) > 0xFFFF:
        raise ValueError("vpcd frame payload is at most 65535 bytes")
    return len(payload).to_bytes(2) + payload


class FrameDecoder:
    """Sans-IO splitter of a vpcd byte stream into frame payloads."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the payloads of the frames now complete."""
        self._buffer += data
        out = []
        while len(self._buffer) >= 2:
            n = int.from_bytes(self._buffer[:2])
            if len(self._buffer) < 2 + n:
                break
            out.append(bytes(self._buffer[2 : 2 + n]))
            del self._buffer[: 2 + n]
        return out


class VpcdSession:
    """Sans-IO card side of vpcd: payload in, reply payload (or None) out."""

    def __init__(self, card: ServedCard) -> None:
        self.card = card
        self.atr = card.power_on()

    def handle(self, payload: bytes) -> bytes | None:
        """Answer one frame payload; controls other than ATR get no reply."""
        if len(payload) != 1:
            return self.card.transmit(payload)
        ctrl = payload[0]
        if ctrl == CTRL_OFF:
            self.card.power_off()
        elif ctrl in (CTRL_ON, CTRL_RESET):
            self.atr = self.card.power_on()
        elif ctrl == CTRL_ATR:
            return self.atr
        # Unknown controls are ignored, as vicc does: answering would desynchronise the stream.
        return None


def serve(
    card: ServedCard,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    after_exchange: Callable[[bytes, bytes], None] = lambda c, r: None,
    say: Callable[[str], None] = print,
    retry_seconds: float = 1.0,
) -> None:
    """Serve ``card`` until interrupted (KeyboardInterrupt), reconnecting whenever vpcd goes away.

    ``after_exchange(c_apdu, r_apdu)`` runs after every APDU, e.g. to save the card image.
    """
    session = VpcdSession(card)
    waiting_said = False
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
        except OSError as err:
            if not waiting_said:
                say(
                    f"waiting for vpcd on {host}:{port} ({err.strerror or err}); is pcscd running with vsmartcard-vpcd?"
                )
                waiting_said = True
            time.sleep(retry_seconds)
            continue
        waiting_said = False
        say(f"card inserted into vpcd at {host}:{port}")
        try:
            _pump(conn, session, after_exchange)
        except OSError as err:
            say(f"vpcd connection lost ({err}); reconnecting")
        finally:
            conn.close()
        card.power_off()


def _pump(conn: socket.socket, session: VpcdSession, after_exchange: Callable[[bytes, bytes], None]) -> None:
    conn.settimeout(None)
    decoder = FrameDecoder()
    while True:
        data = conn.recv(4096)
        if not data:
            raise ConnectionResetError("vpcd closed the connection")
        _ack_at_once(conn)
        for payload in decoder.feed(data):
            reply = session.handle(payload)
            if reply is not None:
                conn.sendall(frame(reply))
                if len(payload) > 1:
                    after_exchange(payload, reply)


def _ack_at_once(conn: socket.socket) -> None:
    """Acknowledge what vpcd sent without the kernel's delayed ACK. vpcd writes a frame's length and its payload in
    two sends and holds the payload (Nagle) until the length is acknowledged: with delayed ACKs every APDU waited
    ~40 ms (an active audit through pcscd: 85 s a card); so ~0.1 ms. Linux re-arms delayed ACKs after a read, hence
    after every read; where the option does not exist nothing changes."""
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        conn.setsockopt(socket.IPPROTO_TCP, quickack, 1)
