"""`card serve` speaks the vpcd protocol: against a stand-in vpcd socket here, and against the real
pcscd + vpcd + pyscard stack in test_pcsc_stack.py."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from support import TERMINAL, WHEN, ServedCard, new_card, new_psam

from cardsim.apdu import split_response
from cardsim.image import load_purse, save_purse
from cardsim.purse import ATR
from cardsim.vpcd import FrameDecoder, VpcdSession, frame
from terminals.flows import TransactionError, exchange, purchase
from terminals.reader import InProcessReader


def test_session_answers_controls_like_vicc() -> None:
    card = new_card()
    session = VpcdSession(card)
    assert session.handle(b"\x04") == ATR
    assert session.handle(b"\x01") is None
    assert session.handle(bytes.fromhex("00A4040008A000000632010105"))[-2:] == b"\x90\x00"
    assert session.handle(b"\x00") is None  # power off: selection is gone
    assert session.handle(bytes.fromhex("805C000204")) == b"\x69\x85"
    assert session.handle(b"\x02") is None and session.handle(b"\x09") is None


class FakeVpcd:
    """A stand-in for pcscd's vpcd socket: the card side connects to it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(20)
        self.port = self.server.getsockname()[1]

    def accept(self) -> FakeVpcdLink:
        conn, _ = self.server.accept()
        conn.settimeout(20)
        return FakeVpcdLink(conn)


class FakeVpcdLink(InProcessReader):
    """Reader side of one vpcd connection, usable by the terminal flows."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.decoder, self.name, self.queue = conn, FrameDecoder(), "fake vpcd", []

    def request(self, payload: bytes) -> bytes:
        self.conn.sendall(frame(payload))
        while not self.queue:
            data = self.conn.recv(4096)
            assert data, "card side closed the connection"
            self.queue += self.decoder.feed(data)
        return self.queue.pop(0)

    def connect(self) -> bytes:
        self.conn.sendall(frame(b"\x01"))
        return self.request(b"\x04")

    def transmit(self, apdu: bytes) -> bytes:
        return self.request(apdu)


def test_card_serve_survives_power_cycles_and_reconnects_and_saves(tmp_path: Path) -> None:
    image = tmp_path / "card.json"
    save_purse(image, new_card().state)
    vpcd = FakeVpcd()
    psam = InProcessReader(new_psam())
    with ServedCard(image, "--port", str(vpcd.port)) as serve:
        link = vpcd.accept()
        assert link.connect() == ATR
        purchase(link, psam, TERMINAL, 100, WHEN)
        link.conn.sendall(frame(b"\x00"))  # power off, then on: the selection must be gone
        assert link.connect() == ATR
        _data, sw = split_response(link.transmit(bytes.fromhex("805C000204")))
        assert sw == 0x6985
        link.conn.close()  # pcscd restarts: the card side must come back by itself
        link = vpcd.accept()
        link.connect()
        purchase(link, psam, TERMINAL, 200, WHEN)
        with pytest.raises(TransactionError) as err:
            exchange(link, "junk", b"\xff\xff", None)
        assert err.value.sw == 0x6700
        deadline = time.monotonic() + 10
        while load_purse(image).balance != 4700 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert load_purse(image).balance == 4700, "the image is saved after each committed transaction"
    assert serve.returncode == 0, serve.output
    assert "stopped; card image saved" in serve.output and "Traceback" not in serve.output
    assert load_purse(image).offline_counter == 2
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
