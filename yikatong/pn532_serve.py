"""Serve an M1 card image through an emulated PN532 on a pseudo-terminal, for libnfc's ``pn532_uart`` driver.

The thin I/O adapter around ``cardsim.pn532``: one pty, one select loop, so hosts are served one command at a
time. The image file is rewritten after each exchange that changed the card.
"""

from __future__ import annotations

import os
import secrets
import select
import tty
from collections.abc import Callable
from pathlib import Path

from cardsim.image import load_card, save_card
from cardsim.mifare import M1Card, M1State
from cardsim.pn532 import MifareSession, Pn532
from terminals.m1 import M1Reader


def _session(card: M1Card, uid: int) -> MifareSession:
    return M1Reader(card, uid)


class Pn532Pty:
    """A pty whose slave end a host opens as ``pn532_uart:<slave_name>``; close it with ``close``."""

    def __init__(self, state: M1State) -> None:
        self.chip = Pn532(M1Card(state, secrets.token_bytes), _session)
        self.master, self._slave = os.openpty()
        # Our own slave fd stays open: once the last slave closes, the master reads EIO forever.
        tty.setraw(self._slave)
        self.slave_name = os.ttyname(self._slave)

    def pump(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for host bytes and answer them; False when nothing came."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 4096)
        except OSError:
            return False
        reply = self.chip.receive(data)
        if reply:
            os.write(self.master, reply)
        return True

    def close(self) -> None:
        """Close both ends."""
        os.close(self.master)
        os.close(self._slave)


def serve_pn532(image_path: Path, say: Callable[[str], None] = print) -> None:
    """Serve the M1 image at ``image_path`` until interrupted; first says the ``LIBNFC_DEFAULT_DEVICE=`` line."""
    state = load_card(image_path)
    if not isinstance(state, M1State):
        raise ValueError(f"{image_path} is a CPU card: the PN532 emulator carries M1 cards only")
    port = Pn532Pty(state)
    say(f"LIBNFC_DEFAULT_DEVICE=pn532_uart:{port.slave_name}")
    saved = list(state.blocks)
    try:
        while True:
            port.pump(None)
            if state.blocks != saved:
                save_card(image_path, state)
                saved = list(state.blocks)
    finally:
        port.close()
